"""What the importers of real datasets share: a list of every problem found (``file:line: what``), cheap media checks,
and an output directory written all at once (staged beside it, then renamed into place: nothing half-written).

An importer reads and checks everything first, without writing; if anything is wrong it raises
:class:`ImportProblems` listing every problem (or, asked to skip bad input, drops what each problem touches and
goes on). Only then does it copy the media into a staging directory, which replaces the output directory whole.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf
from PIL import Image

from cman.data.demo import SPLITS, write_dataset_info, write_split_metadata
from cman.data.errors import DataError
from cman.fsutil import fsync_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    where: str  # "file:line", or "file"
    message: str
    drop: Hashable | None = None  # what skipping it leaves out (its own `where`: the line); None: cannot be skipped

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ImportProblems(DataError):
    """The input of an importer has problems; ``problems`` lists every one of them. Nothing was written."""

    def __init__(self, problems: list[Problem], out: Path) -> None:
        self.problems = list(problems)
        listed = "\n".join(str(p) for p in self.problems[:50])
        more = f"\n... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} problem(s) in the input; nothing was written to {out}:\n{listed}{more}")


@dataclass
class Problems:
    """Problems found while reading an importer's input, in the order found."""

    found: list[Problem] = field(default_factory=list)

    def add(self, where: str, message: str, drop: Hashable | None = None) -> None:
        self.found.append(Problem(where, message, drop))

    def __len__(self) -> int:
        return len(self.found)

    @property
    def dropped(self) -> set[Hashable]:
        return {p.drop for p in self.found if p.drop is not None}

    def settle(self, out: Path, skip_bad: bool) -> None:
        """Raise ImportProblems if there are problems, unless `skip_bad` and every one can be skipped (logged)."""
        if not self.found:
            return
        if skip_bad and all(p.drop is not None for p in self.found):
            for problem in self.found:
                logger.warning("skipped: %s", problem)
            return
        fatal = [p for p in self.found if p.drop is None] if skip_bad else self.found
        raise ImportProblems(fatal, out)


def read_lines(path: Path, problems: Problems) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 text file; an unreadable file is one problem."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        problems.add(str(path), "file not found")
        return
    except (OSError, UnicodeDecodeError) as err:
        problems.add(str(path), f"cannot be read as UTF-8 text ({err})")
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line.strip()


def image_problem(path: Path) -> str | None:
    """Why `path` is not an image CMAN can read (header only: cheap), or None."""
    if not path.is_file():
        return f"image file {path} not found"
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception as err:  # noqa: BLE001 - PIL raises several types for a bad file
        return f"image file {path} cannot be decoded ({type(err).__name__}: {err})"
    return None if width > 0 and height > 0 else f"image file {path} is empty ({width}x{height})"


def audio_problem(path: Path) -> str | None:
    """Why `path` is not audio CMAN can read (header only), or None."""
    if not path.is_file():
        return f"audio file {path} not found"
    try:
        info = sf.info(str(path))
    except Exception as err:  # noqa: BLE001 - soundfile raises several types for a bad file
        return f"audio file {path} cannot be decoded ({err}); use WAV, FLAC, OGG or MP3"
    return None if info.frames > 0 else f"audio file {path} holds no samples"


def media_dir(given: str | Path, inner: tuple[str, ...], what: str) -> Path:
    """`given`, or the folder of the usual name inside it (`flickr_audio/wavs`), that holds the media."""
    root = Path(given)
    if not root.is_dir():
        raise DataError(f"{what} directory {root} not found")
    for name in inner:
        if (root / name).is_dir():
            return root / name
    return root


# ---- the output directory -------------------------------------------------------------------------------------------
def check_output_dir(out: Path) -> None:
    """Refuse at once (before any work) an output path that is a file, or a non-empty directory that is not a dataset
    written by cman (it would be replaced)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()):
        try:
            info = json.loads((out / "dataset.json").read_text())
        except (OSError, ValueError):
            info = None
        if not isinstance(info, dict) or not str(info.get("generator", "")).startswith("cman.data."):
            raise ValueError(
                f"refusing to replace non-empty directory {out}: it is not a dataset written by cman "
                f"({out / 'dataset.json'} missing); choose an empty or new directory"
            )


@contextmanager
def staged_dataset(out: str | Path) -> Iterator[Path]:
    """A fresh seed-layout directory beside `out` to write into; on success it replaces `out` whole (a dataset
    written by cman before is removed), on any error it is deleted and `out` is left as it was."""
    out = Path(out).absolute()
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "audio" / split).mkdir(parents=True)
        (tmp / "metadata").mkdir()
        yield tmp
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
    tmp.rename(out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dataset(
    out: Path, entries: dict[str, list[dict[str, Any]]], info: dict[str, Any], copies: list[tuple[Path, Path]]
) -> dict[str, int]:
    """Copy `copies` (source, path relative to the dataset) and write the metadata of every split and dataset.json,
    all into a staging directory that then replaces `out`. Returns the items per split."""
    from tqdm import tqdm

    counts = {split: len(entries.get(split, [])) for split in SPLITS}
    with staged_dataset(out) as tmp:
        for source, relative in tqdm(copies, desc="copying media", unit="file", disable=None):
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / relative)
        for split in SPLITS:
            write_split_metadata(tmp, split, entries.get(split, []))
        write_dataset_info(tmp, {**info, "counts": counts})
    logger.info("dataset written to %s: %s", out, counts)
    return counts
