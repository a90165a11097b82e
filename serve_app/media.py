"""Media files of gallery items: names per modality for added items, and reads confined to the gallery's roots.

An added item's image and audio are stored as `INDEX_DIR/media/<id>.image<ext>` and `<id>.audio<ext>` (the
extension from the file's magic bytes, `.bin` if unknown), so the two never collide. Records of indexed datasets
point into the dataset root named in `index_meta.json`. A record that points anywhere else is never served.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from cman.fsutil import fsync_dir
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


def write_media(index_dir: Path, name: str, data: bytes) -> None:
    """Write `data` to `index_dir/name` durably (temp file, fsync, rename, fsync of the directory)."""
    path = index_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
    return path.read_bytes(), MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
