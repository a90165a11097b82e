"""For bench/quantize_check.py --onnx: an encoder's HF backbone in ONNX Runtime, fp32 and dynamic int8, timed beside
the torch backbone (fp32 and `serve.quantize` int8) on the same per-request features.

Only the backbone is exported (torch.onnx, dynamo exporter; the projection to the fusion width is one Linear that
stays in torch either way). Needs onnxruntime, onnx and onnxscript, which the project does not install; without them
the result says so.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cman.modality import Modality


class _Positional(torch.nn.Module):
    """The backbone with positional inputs (the exporter's calling convention) and last_hidden_state out."""

    def __init__(self, backbone: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.backbone, self.names = backbone, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.backbone(**dict(zip(self.names, args, strict=True))).last_hidden_state  # (batch, seq, hidden)


def _export(backbone: torch.nn.Module, example: dict[str, torch.Tensor], modality: Modality, path: Path) -> None:
    names = list(example)
    seq = torch.export.Dim("seq", min=2, max=4096)
    dims = tuple({1: seq} if modality == Modality.TEXT else {} for _ in names)  # media inputs have a fixed size
    torch.onnx.export(
        _Positional(backbone, names).eval(),
        tuple(example[n] for n in names),
        str(path),
        input_names=names,
        output_names=["hidden"],
        dynamic_shapes=(dims,),
        dynamo=True,
    )


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p95 of `samples` (seconds), in milliseconds."""
    ordered = sorted(samples)
    return {"p50_ms": 1e3 * statistics.median(ordered), "p95_ms": 1e3 * ordered[int(0.95 * (len(ordered) - 1))]}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine over tokens of two (1, seq, hidden) outputs."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)))


def _runners(backbone: torch.nn.Module, example: dict, modality: Modality, tmp: Path) -> dict:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cman.quantize import quantize_linear

    path, qpath = tmp / f"{modality.value}.onnx", tmp / f"{modality.value}.int8.onnx"
    _export(backbone, example, modality, path)
    # MatMul/Gemm only, like serve.quantize's Linear-only int8 (ORT's default also quantizes convolutions)
    quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    sessions = {
        k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        for k, p in (("onnx_fp32", path), ("onnx_int8", qpath))
    }
    int8 = quantize_linear(copy.deepcopy(backbone).eval(), "int8", purpose="bench")

    def onnx(session):
        wanted = [i.name for i in session.get_inputs()]
        return lambda f: session.run(None, {n: f[n].numpy() for n in wanted})[0]

    def torch_run(module):
        return lambda f: module(**f).last_hidden_state.numpy()

    return {
        "torch_fp32": torch_run(backbone),
        "torch_int8": torch_run(int8),
        **{k: onnx(s) for k, s in sessions.items()},
    }


def onnx_latency(model, config, items, modality: Modality, warmup: int = 3) -> dict:
    """p50/p95 ms per runner on the backbone features of `items` one at a time, and token cosine vs torch fp32."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        return {"error": f"not measured: {err}"}
    from cman.training import make_loader

    features = [b["inputs"][modality] for b in make_loader(config, model, items, train=False, batch_size=1)]
    backbone = model.encoders[modality.value].backbone.eval()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        try:
            runners = _runners(backbone, features[0], modality, Path(tmp))
        except Exception as err:  # noqa: BLE001 - an export that fails is a result here
            return {"error": f"export failed: {type(err).__name__}: {str(err)[:300]}"}
        times: dict[str, list[float]] = {k: [] for k in runners}
        cosine: dict[str, list[float]] = {k: [] for k in runners}
        for n, f in enumerate(features):
            outs = {}
            for name in list(runners)[n % 4 :] + list(runners)[: n % 4]:
                started = time.perf_counter()
                outs[name] = runners[name](f)
                if n >= warmup:
                    times[name].append(time.perf_counter() - started)
            for name, out in outs.items():
                cosine[name].append(_cosine(outs["torch_fp32"], out))
    out = {
        name: {**percentiles(v), "token_cosine_vs_torch_fp32": float(np.mean(cosine[name]))}
        for name, v in times.items()
    }
    for name in runners:
        out[name]["p50_over_torch_fp32"] = out[name]["p50_ms"] / out["torch_fp32"]["p50_ms"]
    return out
