"""CMAN: cross-modal retrieval across text, speech/audio and images (torch + transformers + peft only)."""

from cman.modality import ALL_MODALITIES, Modality

__version__ = "0.1.0"
__all__ = ["ALL_MODALITIES", "Modality", "__version__"]
