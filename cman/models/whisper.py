"""Whisper's encoder as an audio backbone: only the encoder is loaded, its 30 s window cut to `max_seconds`.

OpenAI's checkpoints (`openai/whisper-*`, or a local copy) hold a `WhisperForConditionalGeneration`: the encoder's
weights live under `model.encoder.*`. `WhisperAudioEncoder.from_pretrained` maps those onto a bare `WhisperEncoder`
and never materialises the decoder (its keys are skipped when the file is read), so neither memory, a Serve replica
nor a checkpoint ever holds it.

The HF encoder insists on a 30 s input (3000 log-mel frames, `max_source_positions` = 1500 after its stride-2 conv):
`cut_window` keeps only the first positions a `max_seconds` window needs, so a 2 s clip costs a 2 s forward pass.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from cman.data.audio import whisper_window_frames

logger = logging.getLogger(__name__)

MODEL_TYPE = "whisper"
# a WhisperModel / WhisperForConditionalGeneration file names the encoder `model.encoder.*` / `encoder.*`
_ENCODER_KEYS = {r"^model\.encoder\.": "", r"^encoder\.": ""}


class WhisperAudioEncoder(WhisperEncoder):
    """A `WhisperEncoder` loadable from a whole Whisper checkpoint: decoder and LM-head weights are skipped."""

    _keys_to_ignore_on_load_unexpected = [r"^model\.decoder\.", r"^decoder\.", r"^proj_out\."]


def load_whisper_encoder(source: str, max_seconds: float, **kwargs: Any) -> WhisperAudioEncoder:
    """The encoder of the Whisper model at `source` (local dir or hub id), its window cut to `max_seconds`."""
    encoder = WhisperAudioEncoder.from_pretrained(source, key_mapping=_ENCODER_KEYS, **kwargs)
    return cut_window(encoder, max_seconds)


def whisper_encoder_from_config(config: WhisperConfig, max_seconds: float) -> WhisperAudioEncoder:
    """A randomly initialised encoder (`model.audio.init: {model_type: whisper, ...}`), window cut to `max_seconds`."""
    return cut_window(WhisperAudioEncoder(config), max_seconds)


def cut_window(encoder: WhisperEncoder, max_seconds: float) -> WhisperEncoder:
    """Keep the first positions of `encoder.embed_positions` that `max_seconds` of audio needs (in place).

    The encoder then takes exactly `2 * positions` mel frames (`cman.data.audio.whisper_window_frames`), which is
    what the audio processor pads or cuts every clip to.
    """
    positions = whisper_window_frames(max_seconds) // 2
    available = encoder.embed_positions.num_embeddings
    if positions > available:
        raise ValueError(
            f"model.audio.max_seconds: {max_seconds:g} s needs {positions} encoder positions, but this Whisper model "
            f"has {available} ({available / 50:g} s); set model.audio.max_seconds to at most {available / 50:g}"
        )
    if positions < available:
        table = encoder.embed_positions.weight.detach()[:positions].clone()  # (positions, d_model)
        encoder.embed_positions = nn.Embedding.from_pretrained(table, freeze=True)
        encoder.max_source_positions = positions
        encoder.config.max_source_positions = positions  # what WhisperEncoder.forward checks the input length against
        logger.info("whisper: window cut to %d positions (%.2f s)", positions, positions / 50)
    return encoder


__all__ = ["MODEL_TYPE", "WhisperAudioEncoder", "cut_window", "load_whisper_encoder", "whisper_encoder_from_config"]
