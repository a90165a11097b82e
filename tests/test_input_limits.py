"""Library input checks the service relies on: bounded audio decoding, text normalisation, manifest confinement."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from cman.data.audio import check_audio_header, decode_audio, min_input_samples
from cman.data.dataset import load_split
from cman.data.errors import DataError, LimitError
from cman.data.text import clean_caption, normalize_text


def wav_bytes(samples: int, rate: int, *, declared_rate: int | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(np.arange(samples) / 3)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    if declared_rate is not None:  # rewrite the fmt chunk: sample rate and byte rate
        struct.pack_into("<II", data, 24, declared_rate, declared_rate * 2)
    return bytes(data)


def silent_flac(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), dtype=np.int16), rate, format="FLAC")
    return buf.getvalue()


def peak_mib(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_sample_rate_bomb_is_refused_from_the_header() -> None:
    bomb = wav_bytes(100_000, 16000, declared_rate=1)  # 200 KB that resampled whole would be ~1.6e9 samples
    with pytest.raises(DataError, match="sample rate of 1 Hz"):
        check_audio_header(bomb)
    (error, peak) = peak_mib(lambda: pytest.raises(DataError, decode_audio, bomb, 16000, max_seconds=10.0))
    assert peak < 20, f"refusing the bomb took {peak:.0f} MiB"


def test_an_hour_of_flac_is_refused_or_cut_in_bounded_memory() -> None:
    flac = silent_flac(3600.0)
    assert len(flac) < 2_000_000
    with pytest.raises(LimitError, match="3,600.0 s long, over the 60 s limit"):
        check_audio_header(flac, max_duration_s=60.0)
    wave, peak = peak_mib(lambda: decode_audio(flac + b"", 16000, max_seconds=10.0, min_samples=None))
    assert wave.shape == (160_000,)
    assert peak < 30, f"decoding 10 s of an hour-long FLAC peaked at {peak:.0f} MiB (whole: ~220 MiB)"


@pytest.mark.parametrize("seconds, refused", [(8.0, False), (8.01, True)])
def test_duration_limit_at_and_past(seconds: float, refused: bool) -> None:
    data = wav_bytes(int(round(seconds * 16000)), 16000)
    if refused:
        with pytest.raises(LimitError, match="over the 8 s limit"):
            decode_audio(data, 16000, max_seconds=10.0, max_duration_s=8.0)
    else:
        assert decode_audio(data, 16000, max_seconds=10.0, max_duration_s=8.0).shape == (128_000,)


def test_conv_stack_minimum_length() -> None:
    wav2vec2 = ((10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))
    assert min_input_samples(*wav2vec2) == 400
    assert decode_audio(wav_bytes(400, 16000), 16000, min_samples=400).shape == (400,)
    with pytest.raises(DataError, match="needs at least 400"):
        decode_audio(wav_bytes(399, 16000), 16000, min_samples=400)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("ａ ｂｃ\u200b d\te\n", "a bc d e"),
        ("red\x00 circle\x07", "red circle"),
        ("  two   spaces ", "two spaces"),
    ],
)
def test_text_is_normalised(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


@pytest.mark.parametrize("raw", ["\x00" * 10, "\x01\x02\x1b", "\u200b\u200e", "\ue000"])
def test_control_only_text_is_empty(raw: str) -> None:
    with pytest.raises(DataError, match="empty after removing control characters"):
        clean_caption(raw)


def test_text_limit_at_and_past() -> None:
    assert len(clean_caption("x" * 200, max_chars=200)) == 200
    with pytest.raises(LimitError, match="201 characters, over the 200-character limit"):
        clean_caption("x" * 201, max_chars=200)


@pytest.mark.parametrize("name", ["/etc/passwd", "../../secret.wav", "sub/../../x.wav", "C:\\x.wav", "..\\x.wav"])
def test_manifest_paths_stay_inside_the_dataset(tmp_path, name: str) -> None:
    (tmp_path / "metadata").mkdir()
    entries = [{"id": "ok", "caption": "fine", "audio_filename": "sub/a.wav"}, {"id": "evil", "audio_filename": name}]
    (tmp_path / "metadata" / "train_metadata.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"item evil: audio_filename .* must be a path inside .*audio/train"):
        load_split(tmp_path, "train")
    entries.pop()
    (tmp_path / "metadata" / "train_metadata.json").write_text(json.dumps(entries))
    assert load_split(tmp_path, "train")[0].audio_path == tmp_path / "audio" / "train" / "sub" / "a.wav"
