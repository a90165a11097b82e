#!/usr/bin/env python
"""What `serve.quantize: int8` changes for a trained checkpoint: encoder replica latency and retrieval.

    python bench/quantize_check.py --checkpoint outputs/quickstart/best [--data data/demo] [--split test]
    python bench/quantize_check.py --checkpoint CKPT --onnx     # + ONNX Runtime fp32/int8 backbones (report only)

One process, one checkpoint, the same test items:
- latency: per modality, three encoder replicas as serve_app builds them (`serve_app.encoders.ModalityEncoderServer`,
  the torch threads a replica of `--cpus` gets: one for the default 0.25) — fp32, bf16 autocast (emulated on a CPU
  without bf16 units: reported, not a candidate there) and int8 — answer the same requests one at a time, the
  three in turn on each request, so background load hits them alike. Per replica the p50/p95 of the forward alone
  (`_run`) and of the whole request (decode + features, measured once per request and shared, + that forward);
  ratios are over fp32.
- retrieval: six-direction R@1 of the fp32 model and of the model with int8 encoders (the fusion stays fp32), with
  gallery and queries embedded alike (a gallery built by `cman index` with the same setting), and with int8 queries
  against an fp32 gallery (a gallery built before the setting changed); plus the top-10 agreement with fp32.
- `--onnx` (needs onnxruntime, onnx and onnxscript, which the project does not install): per modality, the HF
  backbone exported with torch.onnx (dynamo) and ONNX Runtime's dynamic int8 quantization of it, timed beside the
  torch backbone (fp32 and int8) on the same features, with the mean token cosine of each against torch fp32.
Prints JSON (bench/results/quantize_check.json unless --out).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import numpy as np
from emit import emit_json  # noqa: E402 - bench/ is sys.path[0] when a script here runs
from onnx_backbones import percentiles  # noqa: E402
from precision_check import top_k_agreement  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPLICAS = {"fp32": {"dtype": "fp32"}, "bf16": {"dtype": "bf16"}, "int8": {"dtype": "auto", "quantize": "int8"}}


def payloads(items, modality) -> list:
    """What a client sends per request: the caption, or the media file's bytes."""
    from cman.modality import Modality

    if modality == Modality.TEXT:
        return [i.caption for i in items if i.caption]
    return [Path(i.source(modality)).read_bytes() for i in items if i.has(modality)]


def replica_latency(checkpoint: str, modality, items, cpus: float, warmup: int = 3) -> dict:
    """fp32 / bf16 / int8 replicas of `modality` on the same requests, in turn: forward and request p50/p95."""
    from cman.config import ServeConfig
    from serve_app.encoders import ModalityEncoderServer

    servers = {
        name: ModalityEncoderServer(checkpoint, modality.value, ServeConfig(num_cpus_per_replica=cpus, **settings))
        for name, settings in REPLICAS.items()
    }
    first = servers["fp32"]
    forward: dict[str, list[float]] = {name: [] for name in servers}
    request: dict[str, list[float]] = {name: [] for name in servers}
    for n, payload in enumerate(payloads(items, modality)):
        started = time.perf_counter()
        features = first._features(payload)  # the same processor and limits in every replica
        prepare = time.perf_counter() - started
        if "error" in features:
            raise RuntimeError(f"{modality.value} item {n}: {features['error']}")
        order = list(servers)[n % 3 :] + list(servers)[: n % 3]  # rotate who goes first
        for name in order:
            started = time.perf_counter()
            servers[name]._run([features])
            elapsed = time.perf_counter() - started
            if n >= warmup:
                forward[name].append(elapsed)
                request[name].append(prepare + elapsed)
    out = {"requests": len(forward["fp32"]), "info": {k: s.info()["numerics"] for k, s in servers.items()}}
    for label, samples in (("forward", forward), ("request", request)):
        stats = {name: percentiles(v) for name, v in samples.items()}
        for name in ("bf16", "int8"):
            stats[f"{name}_over_fp32"] = {q: stats[name][f"{q}_ms"] / stats["fp32"][f"{q}_ms"] for q in ("p50", "p95")}
        out[label] = stats
    return out


def recall_at_1(sets, query_sets=None) -> dict[str, float]:
    """R@1 per direction; queries from `query_sets` (default: `sets`) against galleries from `sets`."""
    from cman.metrics import DIRECTIONS, _parse_direction, dedupe, direction_metrics

    query_sets = query_sets or sets
    out = {}
    for name in DIRECTIONS:
        src, dst = _parse_direction(name)
        if src in sets and dst in sets:
            out[name] = round(direction_metrics(dedupe(query_sets[src]), dedupe(sets[dst]), ks=(1,))["R@1"], 2)
    return out


def retrieval(model, loader, device) -> dict:
    """R@1 of fp32 and int8 encoders (fusion fp32), and their top-10 agreement."""
    from cman.quantize import quantize_encoders
    from cman.steps import compute_embeddings

    int8 = quantize_encoders(copy.deepcopy(model), "int8", purpose="bench")
    sets = {"fp32": compute_embeddings(model, loader, device), "int8": compute_embeddings(int8, loader, device)}
    r1 = {
        "fp32": recall_at_1(sets["fp32"]),
        "int8": recall_at_1(sets["int8"]),
        "int8_queries_fp32_gallery": recall_at_1(sets["fp32"], query_sets=sets["int8"]),
    }
    r1["int8_minus_fp32"] = {d: round(r1["int8"][d] - r1["fp32"][d], 2) for d in r1["fp32"]}
    agreement = top_k_agreement(sets, names=("fp32", "int8"))
    return {"R@1": r1, "top10_agreement": agreement, "top10_agreement_mean": float(np.mean(list(agreement.values())))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=None, help="dataset root (default: the checkpoint config's data.root)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cpus", type=float, default=None, help="num_cpus_per_replica (default: serve's, 0.25)")
    parser.add_argument("--requests", type=int, default=60, help="requests per modality for the latency")
    parser.add_argument("--onnx", action="store_true", help="also time ONNX Runtime fp32/int8 backbones")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/quantize_check.json)")
    args = parser.parse_args()

    import torch

    from cman.config import ServeConfig
    from cman.models.cman import CMAN
    from cman.training import load_items, make_loader
    from serve_app.encoders import limit_threads

    cpus = args.cpus if args.cpus is not None else ServeConfig().num_cpus_per_replica
    limit_threads(cpus)  # what a replica of `cpus` gets, for the embeddings as for the latency
    model = CMAN.from_pretrained(args.checkpoint).merge_adapters().eval()
    config = model.config if args.data is None else model.config.with_overrides({"data.root": args.data})
    items = load_items(config, args.split)
    device = torch.device("cpu")
    result = {
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "items": len(items),
        "machine": platform.processor() or platform.machine(),
        "num_cpus_per_replica": cpus,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "retrieval": retrieval(model, make_loader(config, model, items, train=False, batch_size=16), device),
        "latency": {
            m.value: replica_latency(args.checkpoint, m, items[: args.requests + 3], cpus) for m in model.modalities
        },
    }
    if args.onnx:
        from onnx_backbones import onnx_latency

        result["onnx"] = {m.value: onnx_latency(model, config, items[: args.requests + 3], m) for m in model.modalities}
    emit_json(result, "quantize_check", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
