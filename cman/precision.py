"""Which float type the model computes in, for training (`training.mixed_precision`) and serving (`serve.dtype`).

`auto` picks bf16 autocast where the hardware has bf16 matrix units — a CPU whose flags show AMX (`amx_bf16`) or
AVX-512-BF16 (`avx512_bf16`), a GPU that supports bf16 — and fp32 elsewhere: on a CPU without them bf16 is
emulated and slower than fp32. Weights, optimizer state, the loss's similarity matrix and every returned embedding
stay fp32 whatever is chosen.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_announced: set[tuple[str, str, str]] = set()


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags (Linux `/proc/cpuinfo`); empty where that file is absent or unreadable."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_bf16_units(flags: frozenset[str] | set[str] | None = None) -> bool:
    """True where the CPU computes bf16 matrix products natively (AMX or AVX-512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_dtype(
    device: torch.device, mode: str, flags: frozenset[str] | set[str] | None = None, purpose: str = "training"
) -> torch.dtype | None:
    """`mode` ("auto", "no"/"fp32", "bf16", "fp16") on `device` → the autocast dtype, or None for plain fp32.

    auto: bf16 on a CPU with bf16 units (`flags`, default this machine's) and on a GPU that supports bf16, fp16 on
    an older GPU, fp32 on any other CPU. The choice is logged once per process and purpose.
    """
    if mode in ("no", "fp32"):
        return _announce(purpose, mode, device, None, "asked for")
    if mode == "bf16":
        return _announce(purpose, mode, device, torch.bfloat16, "asked for")
    if mode == "fp16":
        return _announce(purpose, mode, device, torch.float16, "asked for")
    if mode != "auto":
        raise ValueError(f"precision {mode!r} is not one of auto, no, fp32, bf16, fp16")
    if device.type == "cuda":
        chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return _announce(purpose, mode, device, chosen, "GPU")
    if cpu_has_bf16_units(flags):
        return _announce(purpose, mode, device, torch.bfloat16, "CPU has AMX / AVX-512-BF16")
    return _announce(purpose, mode, device, None, "CPU has no bf16 units (no amx_bf16 / avx512_bf16 flag)")


def dtype_name(dtype: torch.dtype | None) -> str:
    """None/fp32 → "fp32", bfloat16 → "bf16", float16 → "fp16" (as written into checkpoint metadata)."""
    return _NAMES.get(dtype, "fp32")


def _announce(purpose: str, mode: str, device: torch.device, dtype: torch.dtype | None, why: str):
    key = (purpose, mode, device.type)
    if key not in _announced:
        _announced.add(key)
        logger.info("%s computes in %s on %s (%s=%s: %s)", purpose, dtype_name(dtype), device.type, purpose, mode, why)
    return dtype
