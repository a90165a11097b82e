"""CMAN: cross-modal retrieval across text, speech/audio and images (torch + transformers + peft only).

    from cman import CMAN, Gallery

`CMAN`, `Gallery` and `resolve_checkpoint` are loaded on first use, so `import cman` stays light (no torch import,
and never Ray, MLflow or FastAPI).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from cman.modality import ALL_MODALITIES, Modality

__version__ = "0.1.0"

_LAZY = {"CMAN": "cman.models.cman", "Gallery": "cman.api", "resolve_checkpoint": "cman.api"}
__all__ = ["ALL_MODALITIES", "CMAN", "Gallery", "Modality", "__version__", "resolve_checkpoint"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cman' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
