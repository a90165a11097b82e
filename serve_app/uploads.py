"""One place for the request checks on query fields: text, audio and image uploads, each against its limit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import UploadFile

from cman.data.errors import DataError, LimitError
from serve_app.errors import RequestError

ACCEPTED_TYPES = {
    "image": ("image/",),
    "audio": ("audio/", "video/webm", "video/ogg", "application/ogg"),
}
ANY_BINARY = ("application/octet-stream", "")
# Formats decoded from uploads, told apart by their first bytes (the client's content type decides nothing).
IMAGE_MAGIC = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
}
AUDIO_FORMATS = {"WAV", "FLAC", "OGG", "MP3"}  # libsndfile's names; its 20-odd others (AIFF, CAF, W64, ...) refused
# What decoding may cost, in samples (rate x channels x seconds, the seconds capped at max_audio_seconds): a minute
# of 48 kHz stereo, 22 MiB as float32. 8 channels at 384 kHz for 10 s (30.7 M samples) is refused; 8 s of mono at
# 384 kHz (3.1 M) is decoded and resampled.
MAX_DECODED_SAMPLES = 48_000 * 2 * 60


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_text_chars: int = 2000
    max_audio_seconds: float = 60.0
    max_form_fields: int = 8

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Limits:
        return cls(
            max_upload_bytes=int(float(settings.get("max_upload_mb", 10.0)) * 1024 * 1024),
            max_text_chars=int(settings.get("max_text_chars", cls.max_text_chars)),
            max_audio_seconds=float(settings.get("max_audio_seconds", cls.max_audio_seconds)),
            max_form_fields=int(settings.get("max_form_fields", cls.max_form_fields)),
        )


def _as_request_error(err: DataError, bad_status: int) -> RequestError:
    return RequestError(413 if isinstance(err, LimitError) else bad_status, str(err))


def check_text(text: str | None, limits: Limits) -> str | None:
    """Normalised text, None when the field is absent or blank; 400 if only control characters, 413 if too long."""
    from cman.data.text import clean_caption

    if text is None or not text.strip():
        return None  # absent, or a blank form field
    try:
        return clean_caption(text, max_chars=limits.max_text_chars)
    except DataError as err:
        raise _as_request_error(err, 400) from None


async def read_upload(name: str, upload: UploadFile | None, limits: Limits) -> bytes | None:
    if upload is None or isinstance(upload, str):
        return None
    if not upload.filename and not upload.size:
        return None  # an empty file input of an HTML form
    limit = limits.max_upload_bytes
    if upload.size is not None and upload.size > limit:
        message = f"{name} upload is {upload.size:,} bytes, over the {limit:,}-byte limit (max_upload_mb)"
        raise RequestError(413, message)
    ctype = (upload.content_type or "").split(";")[0].strip().lower()
    if ctype not in ANY_BINARY and not ctype.startswith(ACCEPTED_TYPES[name]):
        example = "image/png, image/jpeg" if name == "image" else "audio/wav"
        raise RequestError(415, f"{name} upload has content type {ctype!r}; send {name}/* (e.g. {example})")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise RequestError(413, f"{name} upload is over the {limit:,}-byte limit (max_upload_mb)")
    if not data:
        raise RequestError(400, f"{name} upload is empty; send a non-empty file")
    check_media(name, data, limits)
    return data


def check_media(name: str, data: bytes, limits: Limits) -> None:
    """The checks on media bytes before any replica decodes them: the format by content (415), and for audio the
    declared duration (413) and decoding cost from its header."""
    if name == "audio":
        from cman.data.audio import check_audio_header

        try:  # header only: the declared rate and duration, before any replica decodes it
            check_audio_header(data, limits.max_audio_seconds)
        except DataError as err:
            raise _as_request_error(err, 415) from None
        check_audio_format(data, limits.max_audio_seconds)
    else:
        check_image_format(data)


def check_image_format(data: bytes) -> str:
    """The upload's image format from its first bytes; 415 unless PNG, JPEG, WebP, GIF or BMP."""
    for fmt, magics in IMAGE_MAGIC.items():
        if data.startswith(magics):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    message = "image upload could not be decoded: it is not PNG, JPEG, WebP, GIF or BMP (told by its content)"
    raise RequestError(415, message + "; send one of those")


def check_audio_format(data: bytes, max_seconds: float = 60.0) -> str:
    """The upload's audio format from its header; 415 unless WAV, FLAC, OGG (Vorbis/Opus) or MP3 whose decoding
    costs at most MAX_DECODED_SAMPLES (rate x channels x its seconds, capped at `max_seconds`)."""
    import io

    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - check_audio_header has opened it already; any failure here is the same 415
        raise RequestError(415, "audio upload could not be read; send WAV, FLAC, OGG or MP3") from None
    if info.format not in AUDIO_FORMATS:
        raise RequestError(415, f"audio upload is {info.format} ({info.format_info}); send WAV, FLAC, OGG or MP3")
    seconds = min(max(info.frames, 0) / max(info.samplerate, 1), max_seconds)
    if info.samplerate * info.channels * seconds > MAX_DECODED_SAMPLES:
        shape = f"{info.channels} channel(s) at {info.samplerate:,} Hz for {seconds:.1f} s"
        raise RequestError(
            415, f"audio upload is {shape}, over {MAX_DECODED_SAMPLES:,} samples to decode; send mono or stereo audio"
        )
    return info.format


async def payloads(limits: Limits, text: str | None, audio: Any, image: Any) -> dict[str, Any]:
    """The query's payloads by modality (text normalised, uploads read within their limits)."""
    found: dict[str, Any] = {}
    cleaned = check_text(text, limits)
    if cleaned is not None:
        found["text"] = cleaned
    for name, upload in (("audio", audio), ("image", image)):
        data = await read_upload(name, upload, limits)
        if data is not None:
            found[name] = data
    return found
