"""Media of gallery items: names per modality for added items, and file reads confined to the gallery's roots.

An added item's image and audio are stored in the gallery store (blobs, in the add's transaction) under the names
`media/<id>.image<ext>` and `media/<id>.audio<ext>` (the extension from the file's magic bytes, `.bin` if unknown),
so the two never collide. Records of indexed datasets hold absolute paths into the dataset root named in
`index_meta.json`; a record that points anywhere else is never served.
"""

from __future__ import annotations

import json
from pathlib import Path

from serve_app.errors import RequestError

MEDIA_DIR = "media"
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".mp3": "audio/mpeg",
}
_MAGIC = (
    (b"\x89PNG", ".png"),
    (b"\xff\xd8", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"RIFF", None),  # WAV or WEBP: see extension()
    (b"fLaC", ".flac"),
    (b"OggS", ".ogg"),
    (b"ID3", ".mp3"),
)


def extension(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            if ext is None:
                return ".webp" if data[8:12] == b"WEBP" else ".wav"
            return ext
    return ".bin"


def strip_image_metadata(data: bytes) -> bytes:
    """`data` without EXIF / XMP / comments / text chunks: the same bytes if it has none, else re-encoded in its own
    format with its EXIF orientation applied first (so it still shows as it was embedded)."""
    import io

    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        carries = bool(img.getexif()) or any(k in img.info for k in METADATA_KEYS)
        if not carries or fmt not in RESAVE:
            return data
        img.load()
        clean = ImageOps.exif_transpose(img)
    clean.info = {}  # nothing of the original's metadata travels to the new file
    out = io.BytesIO()
    clean.save(out, format=fmt, **RESAVE[fmt])
    return out.getvalue()


METADATA_KEYS = ("exif", "xmp", "XML:com.adobe.xmp", "comment", "icc_profile_name", "Description", "Author", "gps")
RESAVE = {"JPEG": {"quality": 95}, "PNG": {}, "WEBP": {"quality": 95}, "GIF": {}, "BMP": {}}


def media_name(item_id: str, kind: str, data: bytes) -> str:
    """Where an added item's `kind` ("image" / "audio") file goes, relative to the index directory."""
    return f"{MEDIA_DIR}/{item_id}.{kind}{extension(data)}"


def media_type(name: str) -> str:
    """The media type of a stored media name, by its extension."""
    return MEDIA_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def allowed_roots(index_dir: Path) -> list[Path]:
    """The directories records may point into: `index_dir/media` and the indexed dataset's root."""
    roots = [(index_dir / MEDIA_DIR).resolve()]
    meta = index_dir / "index_meta.json"
    if meta.is_file():
        root = json.loads(meta.read_text()).get("root")
        if root:
            roots.append(Path(root).resolve())
    return roots


def read_media(index_dir: Path, roots: list[Path], item_id: str, kind: str, stored: str | None) -> tuple[bytes, str]:
    """The bytes and media type of a record's `kind` file; 404 if absent or outside `roots`."""
    if not stored:
        raise RequestError(404, f"item {item_id!r} has no {kind}")
    path = (Path(stored) if Path(stored).is_absolute() else index_dir / stored).resolve()
    if not any(path.is_relative_to(root) for root in roots):
        raise RequestError(404, f"the {kind} of item {item_id!r} is outside the gallery's media and dataset roots")
    if not path.is_file():
        raise RequestError(404, f"the {kind} file of item {item_id!r} is missing on the server")
    return path.read_bytes(), media_type(path.name)
