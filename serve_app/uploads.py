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
    if name == "audio":
        from cman.data.audio import check_audio_header

        try:  # header only: the declared rate and duration, before any replica decodes it
            check_audio_header(data, limits.max_audio_seconds)
        except DataError as err:
            raise _as_request_error(err, 415) from None
    return data


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
