"""A folder of media as gallery items, no metadata needed (`cman index --from-folder`, `Gallery.build(model, DIR)`).

Images, audio and ``.txt`` files are found recursively (hidden files and folders skipped; symbolic links to folders
not followed). Files of one folder that share a stem form one item (``beach.jpg`` + ``beach.wav`` + ``beach.txt``),
whose id is the path relative to the folder without extension, spelt as the service's item routes accept ids
(``2024/beach`` → ``2024.beach``: ``/`` becomes ``.``, other characters outside ``[A-Za-z0-9_.-]`` become ``_``, a
clash gets ``-2``, ``-3``...), and whose text is the ``.txt`` file's content. Where a stem has two files of one kind
(``a.jpg`` and ``a.png``) nothing is paired: each file of that stem is an item of its own, its id keeping the
extension (``a.jpg``).
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from pathlib import Path, PurePosixPath

from cman.data.dataset import Item
from cman.data.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
TEXT_SUFFIXES = (".txt",)
MAX_TEXT_BYTES = 1 << 20  # a bigger .txt is not a caption
MAX_ID_CHARS = 128  # the gallery store's id column
_NOT_ID = re.compile(r"[^A-Za-z0-9_.\-]")


def item_id(relative: str, taken: set[str]) -> str:
    """`relative` (a posix path without extension) as an id the service's item routes accept, unique in `taken`."""
    base = _NOT_ID.sub("_", relative.replace("/", "."))
    base = base if base[:1].isalnum() else f"x{base}"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    taken.add(candidate)
    return candidate


def media_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    for kind, suffixes in (("image", IMAGE_SUFFIXES), ("audio", AUDIO_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if suffix in suffixes:
            return kind
    return None


def _walk(root: Path) -> dict[tuple[str, str], dict[str, list[Path]]]:
    """(folder relative to root, stem) -> kind -> files, for every media file under root."""
    found: dict[tuple[str, str], dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        for name in sorted(filenames):
            path = folder / name
            kind = media_kind(path)
            if name.startswith(".") or kind is None:
                continue
            if not path.resolve().is_relative_to(root):
                logger.warning("skipped %s: it links outside %s", path, root)
                continue
            found[(folder.relative_to(root).as_posix(), path.stem)][kind].append(path)
    return found


def _text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            logger.warning("skipped %s: over %d bytes, not a caption", path, MAX_TEXT_BYTES)
            return None
        text = path.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as err:
        logger.warning("skipped %s: not readable as UTF-8 text (%s)", path, err)
        return None
    if not text:
        logger.warning("skipped %s: empty", path)
    return text or None


def _item(item_id: str, files: dict[str, Path]) -> Item | None:
    if len(item_id) > MAX_ID_CHARS:
        logger.warning("skipped %s: its id %r is over %d characters", sorted(files.values()), item_id, MAX_ID_CHARS)
        return None
    caption = _text(files["text"]) if "text" in files else None
    if caption is None and "image" not in files and "audio" not in files:
        return None
    return Item(
        id=item_id, group=item_id, caption=caption, image_path=files.get("image"), audio_path=files.get("audio")
    )


def scan_folder(folder: str | Path) -> list[Item]:
    """The items of the media under `folder` (see the module docstring), sorted by id."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise DataError(f"folder {folder} not found: pass a directory of images, audio and .txt files")
    items, taken = [], set()
    for (where, stem), kinds in sorted(_walk(root).items()):
        base = (PurePosixPath(where) / stem).as_posix() if where != "." else stem
        if all(len(paths) == 1 for paths in kinds.values()):
            items.append(_item(item_id(base, taken), {kind: paths[0] for kind, paths in kinds.items()}))
            continue
        names = sorted(p.name for paths in kinds.values() for p in paths)
        logger.warning("%s: %s share a stem with two files of one kind; each is an item of its own", where, names)
        for kind, paths in kinds.items():
            items.extend(_item(item_id(f"{base}{p.suffix}", taken), {kind: p}) for p in sorted(paths))
    items = sorted((item for item in items if item is not None), key=lambda item: item.id)
    if not items:
        raise DataError(f"folder {folder} holds no images, audio or .txt files ({', '.join(IMAGE_SUFFIXES)}, ...)")
    return items
