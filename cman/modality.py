"""The three modalities CMAN embeds, as a str-enum usable as dict/ModuleDict keys."""

from __future__ import annotations

from enum import Enum


class Modality(str, Enum):
    TEXT = "text"
    AUDIO = "audio"
    IMAGE = "image"

    def __str__(self) -> str:
        return self.value


ALL_MODALITIES: tuple[Modality, ...] = (Modality.TEXT, Modality.AUDIO, Modality.IMAGE)
