"""Audio decoding: soundfile (wav/flac/ogg) → mono float32 at the encoder's sampling rate."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from cman.data.errors import DataError

MIN_SAMPLES = 160  # 10 ms at 16 kHz: anything shorter carries no speech


def _where(item_id: str | None, path: str | Path | None) -> str:
    parts = [f"audio file {path}" if path else "audio upload"]
    if item_id is not None:
        parts.append(f"(item {item_id})")
    return " ".join(parts)


def decode_audio(
    source: str | Path | bytes,
    sampling_rate: int,
    *,
    max_seconds: float | None = None,
    item_id: str | None = None,
) -> np.ndarray:
    """Decode `source` (a path or raw bytes) to a mono float32 waveform at `sampling_rate`.  # (samples,)"""
    path = None if isinstance(source, bytes) else Path(source)
    where = _where(item_id, path)
    if path is not None and not path.is_file():
        raise DataError(f"{where} does not exist", item_id=item_id, path=str(path))
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else path
        data, rate = sf.read(handle, dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as err:  # soundfile raises several types for bad input
        raise DataError(
            f"{where} could not be decoded ({err}); send WAV, FLAC or OGG audio",
            item_id=item_id,
            path=str(path) if path else None,
        ) from None
    wave = data.mean(axis=1)  # (samples,)
    if rate != sampling_rate and wave.size:
        wave = soxr.resample(wave, rate, sampling_rate).astype(np.float32)
    if max_seconds is not None:
        wave = wave[: int(max_seconds * sampling_rate)]
    if wave.size < MIN_SAMPLES * sampling_rate // 16000 or not np.isfinite(wave).all():
        raise DataError(f"{where} is empty or too short ({wave.size} samples)", item_id=item_id, path=str(path))
    return np.ascontiguousarray(wave, dtype=np.float32)
