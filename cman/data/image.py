"""Image decoding: PIL, EXIF orientation applied, RGB, decompression bombs refused (LimitError) from the header."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from cman.data.errors import DataError, LimitError, scrub_reprs

MAX_PIXELS = 40_000_000  # a 40 MP photo is the largest we accept
# What the service decodes from uploads (by content, whatever the client's content type says): never EPS/PS (Pillow
# hands those to Ghostscript), nor the long tail of formats Pillow reads.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def decode_image(
    source: str | Path | bytes,
    *,
    item_id: str | None = None,
    max_pixels: int = MAX_PIXELS,
    formats: tuple[str, ...] | None = None,
) -> Image.Image:
    """Decode `source` (a path or raw bytes) to an RGB PIL image with its EXIF orientation applied (the first frame
    of an animation). `formats`: the Pillow formats accepted (None: any); others are a DataError."""
    path = None if isinstance(source, bytes) else Path(source)
    where = f"image file {path}" if path else "image upload"
    if item_id is not None:
        where += f" (item {item_id})"
    if path is not None and not path.is_file():
        raise DataError(f"{where} does not exist", item_id=item_id, path=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = io.BytesIO(source) if isinstance(source, bytes) else path
            with Image.open(handle, formats=formats) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise LimitError(
                        f"{where} is {width}x{height} pixels, over the {max_pixels:,}-pixel limit (max_image_pixels); "
                        "send a smaller image",
                        item_id=item_id,
                        path=str(path) if path else None,
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                return img.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise LimitError(f"{where} is too large: {err}", item_id=item_id, path=str(path) if path else None) from None
    except Exception as err:
        raise DataError(
            f"{where} could not be decoded ({scrub_reprs(str(err), 'the data')}); send a "
            + (", ".join(formats) if formats else "PNG, JPEG or other PIL-readable")
            + " image",
            item_id=item_id,
            path=str(path) if path else None,
        ) from None
