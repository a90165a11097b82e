"""Audio decoding in bounded memory: soundfile (wav/flac/ogg) → mono float32 at the encoder's sampling rate.

The header is read first: its sample rate must be plausible and its duration at most `max_duration_s` (else
`LimitError`); then at most `max_seconds` of frames are decoded, and only those are resampled. A 200 KB WAV that
declares 1 Hz or a small FLAC of an hour of silence therefore never grows to gigabytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from cman.data.errors import DataError, LimitError

MIN_SAMPLES = 160  # 10 ms at 16 kHz: anything shorter carries no speech
MIN_RATE, MAX_RATE = 1_000, 384_000  # Hz: outside this no real recording; 1 Hz is a resampling bomb
MAX_CHANNELS = 32
WHISPER_FRAMES_PER_SECOND = 100  # Whisper's log-mel: 16 kHz, hop 160


def _where(item_id: str | None, path: str | Path | None) -> str:
    parts = [f"audio file {path}" if path else "audio upload"]
    if item_id is not None:
        parts.append(f"(item {item_id})")
    return " ".join(parts)


def whisper_window_frames(max_seconds: float) -> int:
    """Log-mel frames (10 ms hop at 16 kHz) of a Whisper window covering `max_seconds`: even, as the encoder's
    stride-2 convolution halves them into positions (2.3 s → 230 frames → 115 positions; 30 s → 3000 → 1500)."""
    positions = math.ceil(round(max_seconds * WHISPER_FRAMES_PER_SECOND, 6) / 2)
    return 2 * max(1, positions)


def min_input_samples(conv_kernel: Sequence[int], conv_stride: Sequence[int]) -> int:
    """Shortest waveform a wav2vec2/HuBERT conv feature stack turns into at least one frame (400 for the base)."""
    length = 1
    for kernel, stride in reversed(list(zip(conv_kernel, conv_stride, strict=True))):
        length = (length - 1) * int(stride) + int(kernel)
    return length


def _open(source: str | Path | bytes, where: str, item_id: str | None, path: Path | None) -> sf.SoundFile:
    try:
        return sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else path)
    except Exception as err:  # soundfile raises several types for bad input
        raise DataError(
            f"{where} could not be decoded ({err}); send WAV, FLAC or OGG audio",
            item_id=item_id,
            path=str(path) if path else None,
        ) from None


def _check_header(f: sf.SoundFile, where: str, at: dict, max_duration_s: float | None) -> tuple[int, int]:
    rate, frames = int(f.samplerate), int(f.frames)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise DataError(f"{where} declares a sample rate of {rate} Hz; send {MIN_RATE}-{MAX_RATE} Hz audio", **at)
    if f.channels > MAX_CHANNELS:
        raise DataError(f"{where} declares {f.channels} channels; send mono or stereo audio", **at)
    duration = frames / rate if frames > 0 else 0.0
    if max_duration_s is not None and duration > max_duration_s:
        raise LimitError(
            f"{where} is {duration:,.1f} s long, over the {max_duration_s:g} s limit (max_audio_seconds); "
            "send a shorter clip",
            **at,
        )
    return rate, frames


def check_audio_header(source: bytes, max_duration_s: float | None = None) -> float:
    """Read only the header of `source`: DataError if undecodable or implausible, LimitError if too long.

    Returns the declared duration in seconds (0 when the format does not say).
    """
    where, at = "audio upload", {"item_id": None, "path": None}
    with _open(source, where, None, None) as f:
        rate, frames = _check_header(f, where, at, max_duration_s)
    return max(frames, 0) / rate


def decode_audio(
    source: str | Path | bytes,
    sampling_rate: int,
    *,
    max_seconds: float | None = None,
    max_duration_s: float | None = None,
    min_samples: int | None = None,
    item_id: str | None = None,
) -> np.ndarray:
    """Decode `source` (a path or raw bytes) to a mono float32 waveform at `sampling_rate`.  # (samples,)

    `max_seconds`: keep (and decode) only the first `max_seconds`; `max_duration_s`: refuse longer audio with a
    `LimitError` (from the header, before decoding); `min_samples`: the shortest clip the encoder accepts.
    """
    path = None if isinstance(source, bytes) else Path(source)
    where = _where(item_id, path)
    at = {"item_id": item_id, "path": str(path) if path else None}
    if path is not None and not path.is_file():
        raise DataError(f"{where} does not exist", **at)
    with _open(source, where, item_id, path) as f:
        rate, frames = _check_header(f, where, at, max_duration_s)
        keep = frames if frames > 0 else -1
        if max_seconds is not None:
            cap = math.ceil(max_seconds * rate)
            keep = cap if keep < 0 else min(keep, cap)
        try:
            data = f.read(frames=keep, dtype="float32", always_2d=True)  # (samples, channels)
        except Exception as err:  # noqa: BLE001 - truncated/corrupt payloads raise several types
            raise DataError(f"{where} could not be decoded ({err}); send WAV, FLAC or OGG audio", **at) from None
    wave = data.mean(axis=1)  # (samples,)
    if rate != sampling_rate and wave.size:
        wave = soxr.resample(wave, rate, sampling_rate).astype(np.float32)
    if max_seconds is not None:
        wave = wave[: int(max_seconds * sampling_rate)]
    shortest = max(MIN_SAMPLES * sampling_rate // 16000, min_samples or 0)
    if wave.size < shortest or not np.isfinite(wave).all():
        raise DataError(
            f"{where} is empty or too short ({wave.size} samples at {sampling_rate} Hz; this encoder needs at least "
            f"{shortest}) or not finite",
            **at,
        )
    return np.ascontiguousarray(wave, dtype=np.float32)
