"""CMAN model pieces: per-modality HF encoders with LoRA, the shared fusion transformer, the CMAN wrapper."""

from cman.models.cman import CMAN, build_model, count_parameters

__all__ = ["CMAN", "build_model", "count_parameters"]
