"""`serve.quantize`: dynamic int8 quantization of the encoders' Linear layers, for serving and `cman index` on CPU.

int8: every `nn.Linear` of a (LoRA-merged) encoder becomes a dynamically quantized one — weights stored as int8 per
output channel, activations quantized per batch at run time, outputs fp32 — through
`torch.ao.quantization.quantize_dynamic`. Convolutions, embeddings, norms and the fusion transformer stay fp32, and so
does every embedding returned or stored. Why this API (bench/README.md, "int8 encoders"): on a 2-core Zen 3 (AVX2,
no VNNI) torchao's int8 was far slower than fp32, and ONNX Runtime's int8 needs an exported graph per encoder (a
change of runtime, not of this setting). torch.ao.quantization is deprecated, so its warnings are silenced around
the call alone.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8")
_announced: set[tuple[str, str]] = set()


def check_quantize(mode: str) -> str:
    """`mode` if it is a `serve.quantize` value, else a ValueError that names the setting and its values."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"serve.quantize {mode!r} is not one of {', '.join(QUANTIZE_MODES)}")
    return mode


def quantize_linear(module: nn.Module, mode: str, purpose: str = "serving") -> nn.Module:
    """`module` with its nn.Linear layers quantized to dynamic int8 (mode "int8", in place) or unchanged ("none").

    Call it after `merge_adapters()` (LoRA folded in) and `.eval()`, with the module on the CPU: quantized Linear
    kernels run on CPUs only. The first call per purpose and mode logs what was done.
    """
    if check_quantize(mode) == "none":
        _announce(purpose, mode, "encoders keep fp32 Linear layers")
        return module
    devices = {p.device.type for p in module.parameters()}
    if devices - {"cpu"}:
        raise ValueError(
            f"serve.quantize int8 runs on CPUs only, but this {purpose} module is on {sorted(devices)}: set "
            "serve.quantize to none for GPU replicas"
        )
    linear = sum(isinstance(m, nn.Linear) for m in module.modules())
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated (torchao replaces it), but it is what measured faster here
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    _announce(purpose, mode, "Linear layers: int8 weights per channel, activations quantized per batch; fp32 out")
    logger.debug("%s: %d Linear layers quantized to int8", purpose, linear)
    return module


def quantize_encoders(model: nn.Module, mode: str, purpose: str) -> nn.Module:
    """`quantize_linear` on each of a CMAN model's encoders (`model.encoders`); the fusion stays fp32."""
    for encoder in model.encoders.values():
        quantize_linear(encoder.eval(), mode, purpose=purpose)
    return model


def int8_linear_count(module: nn.Module) -> int:
    """How many of `module`'s layers are dynamically quantized int8 Linear layers."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(isinstance(m, DynamicLinear) and m.weight().dtype == torch.qint8 for m in module.modules())


def _announce(purpose: str, mode: str, what: str) -> None:
    if (purpose, mode) not in _announced:
        _announced.add((purpose, mode))
        logger.info("%s encoders: serve.quantize=%s (%s)", purpose, mode, what)
