"""A manifest (CSV or JSON Lines) of your own media → the seed layout.

One row per item; columns (JSON keys) ``image``, ``audio``, ``text`` (at least one per row), optional ``id``,
``group``, ``speaker`` and ``split`` (``train`` / ``val`` / ``test``). Paths are relative to the manifest's folder
(absolute paths work too). Without ``id`` an item is ``row_<n>`` (n-th data row). Without ``group``, rows showing the
same image (else the same audio) form a group, as the 5 captions of one photo do; a group never spans splits. Without
a ``split`` column the groups are split at random (``seed``): ``val_fraction`` / ``test_fraction`` of them.

Every problem is listed with its ``file:line``; by default any problem stops the import before anything is written.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cman.data.demo import SPLITS
from cman.data.importing import Problems, audio_problem, check_output_dir, image_problem, write_dataset

logger = logging.getLogger(__name__)

COLUMNS = ("id", "image", "audio", "text", "group", "speaker", "split")
MEDIA = ("image", "audio", "text")


@dataclass
class Row:
    where: str
    id: str
    group: str
    text: str | None = None
    image: Path | None = None
    audio: Path | None = None
    speaker: str | None = None
    split: str | None = None


def _unknown(columns: list[str]) -> str | None:
    unknown = [c for c in columns if c not in COLUMNS]
    if not unknown:
        return None
    hint = "; a caption goes in `text`" if "caption" in unknown else ""
    return f"unknown column(s) {unknown} (known: {', '.join(COLUMNS)}){hint}"


def read_raw(path: Path, problems: Problems) -> list[tuple[str, dict[str, Any]]]:
    """(where, fields) of every data row of a .csv or .jsonl manifest."""
    if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise ValueError(f"manifest {path}: use a .csv file (with a header row) or a .jsonl file (one object a line)")
    if not path.is_file():
        raise ValueError(f"manifest {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"manifest {path} cannot be read as UTF-8 text ({err})") from None
    return _read_csv(path, text, problems) if path.suffix.lower() == ".csv" else _read_jsonl(path, text, problems)


def _read_csv(path: Path, text: str, problems: Problems) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    header = [c.strip() for c in reader.fieldnames or []]
    bad = _unknown(header) if header else "no header row (e.g. image,audio,text,group)"
    if bad:
        problems.add(f"{path}:1", bad)
        return []
    reader.fieldnames = header
    rows = []
    for fields in reader:
        where = f"{path}:{reader.line_num}"
        if None in fields:
            problems.add(where, f"more cells than the {len(header)} columns of the header", drop=where)
            continue
        rows.append((where, {k: v for k, v in fields.items() if v is not None and v.strip()}))
    return rows


def _read_jsonl(path: Path, text: str, problems: Problems) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as err:
            problems.add(where, f"not valid JSON ({err.msg})", drop=where)
            continue
        bad = "not a JSON object" if not isinstance(fields, dict) else _unknown(list(fields))
        if bad:
            problems.add(where, bad, drop=where)
            continue
        rows.append((where, {k: v for k, v in fields.items() if v is not None and v != ""}))
    return rows


def parse_row(where: str, number: int, fields: dict[str, Any], base: Path, problems: Problems) -> Row | None:
    """A checked row (media files decoded far enough to know they are media), or None after adding its problems."""
    found = len(problems)
    for key, value in fields.items():
        if not isinstance(value, str | int) or isinstance(value, bool) or (key in MEDIA and not isinstance(value, str)):
            problems.add(where, f"{key} must be a string, got {json.dumps(value)[:60]}", drop=where)
    if len(problems) > found:
        return None
    values = {k: str(v).strip() for k, v in fields.items()}
    if not any(values.get(k) for k in MEDIA):
        problems.add(where, "no image, audio or text: an item needs at least one", drop=where)
        return None
    if values.get("split") is not None and values["split"] not in SPLITS:
        problems.add(where, f"split {values['split']!r} is not one of {', '.join(SPLITS)}", drop=where)
    paths = {}
    for kind, check in (("image", image_problem), ("audio", audio_problem)):
        if values.get(kind):
            paths[kind] = base / values[kind]
            bad = check(paths[kind])
            if bad is not None:
                problems.add(where, bad, drop=where)
    if len(problems) > found:
        return None
    item_id = values.get("id") or f"row_{number}"
    group = values.get("group") or values.get("image") or values.get("audio") or item_id
    return Row(
        where,
        item_id,
        group,
        text=values.get("text"),
        image=paths.get("image"),
        audio=paths.get("audio"),
        speaker=values.get("speaker"),
        split=values.get("split"),
    )


def check_rows(rows: list[Row], problems: Problems) -> None:
    """Unique ids; with a split column, every row has a split and no group spans two."""
    ids: dict[str, str] = {}
    for row in rows:
        if row.id in ids:
            problems.add(row.where, f"id {row.id!r} is used again (first at {ids[row.id]})", drop=row.where)
        ids.setdefault(row.id, row.where)
    if not any(row.split for row in rows):
        return
    group_split: dict[str, tuple[str, str]] = {}
    for row in rows:
        if not row.split:
            problems.add(row.where, "no split, while other rows have one: give every row a split", drop=row.where)
            continue
        first = group_split.setdefault(row.group, (row.split, row.where))
        if first[0] != row.split:
            problems.add(
                row.where,
                f"group {row.group!r} is in {row.split} here but in {first[0]} at {first[1]}: a group stays in one "
                "split (its items are relevant to each other)",
                drop=row.where,
            )


def assign_splits(rows: list[Row], seed: int, val_fraction: float, test_fraction: float) -> None:
    """Split the groups at random (seeded): test_fraction of them to test, val_fraction to val, the rest train."""
    groups = list(dict.fromkeys(row.group for row in rows))
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    n_test, n_val = (_share(len(groups), f) for f in (test_fraction, val_fraction))
    split_of = {g: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, g in enumerate(order)}
    for row in rows:
        row.split = split_of[row.group]


def _share(n: int, fraction: float) -> int:
    """round(n * fraction), at least 1 when there are 3 or more groups (each split gets one) and fraction > 0."""
    if fraction <= 0:
        return 0
    return max(1 if n >= 3 else 0, int(round(n * fraction)))


class _Names:
    """Destination names inside one media folder of a split: the manifest's relative path when it is a plain one,
    else the file name; a name taken by another file gets `_2`, `_3`, ... The same source keeps one name."""

    def __init__(self) -> None:
        self.by_source: dict[Path, str] = {}
        self.used: set[str] = set()

    def name(self, source: Path, written: str) -> str:
        key = source.resolve()
        if key in self.by_source:
            return self.by_source[key]
        plain = PurePosixPath(written)
        name = written if not plain.is_absolute() and ".." not in plain.parts and "\\" not in written else source.name
        stem, suffix, k = PurePosixPath(name).with_suffix(""), PurePosixPath(name).suffix, 2
        while name in self.used:
            name, k = f"{stem}_{k}{suffix}", k + 1
        self.used.add(name)
        self.by_source[key] = name
        return name


def plan_entries(rows: list[Row], base: Path) -> tuple[dict[str, list], list[tuple[Path, Path]]]:
    entries: dict[str, list[dict[str, Any]]] = {}
    copies: list[tuple[Path, Path]] = []
    names: dict[tuple[str, str], _Names] = {}
    for row in rows:
        entry: dict[str, Any] = {"id": row.id, "group": row.group}
        if row.text:
            entry["caption"] = row.text
        for kind, folder, path in (("image", "images", row.image), ("audio", "audio", row.audio)):
            if path is None:
                continue
            namer = names.setdefault((kind, row.split), _Names())
            fresh = path.resolve() not in namer.by_source
            name = namer.name(path, _relative(path, base))
            entry[f"{kind}_filename"] = name
            if fresh:
                copies.append((path, Path(folder, row.split, name)))
        if row.speaker:
            entry["speaker"] = row.speaker
        entries.setdefault(row.split, []).append(entry)
    return entries, copies


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.name


def import_manifest(
    out_dir: str | Path,
    manifest: str | Path,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    skip_bad: bool = False,
) -> dict[str, int]:
    """Import the items of `manifest` into `out_dir` (seed layout); returns the items per split.

    Raises ImportProblems listing every problem (nothing written), unless `skip_bad`: then the rows with problems
    are left out and logged.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} + test_fraction {test_fraction}: each >= 0, together < 1")
    out, path = Path(out_dir).absolute(), Path(manifest)
    base = path.parent.absolute()
    problems = Problems()
    raw = read_raw(path, problems)
    check_output_dir(out)  # a foreign directory is refused before the media checks
    rows = [row for k, (where, fields) in enumerate(raw, 1) if (row := parse_row(where, k, fields, base, problems))]
    check_rows(rows, problems)
    problems.settle(out, skip_bad)
    rows = [row for row in rows if row.where not in problems.dropped]
    if not rows:
        raise ValueError(f"manifest {path} has no item to import; {out} not written")
    if not any(row.split for row in rows):
        assign_splits(rows, seed, val_fraction, test_fraction)
    entries, copies = plan_entries(rows, base)
    info = {
        "generator": "cman.data.manifest",
        "manifest": str(path.absolute()),
        "seed": seed,
        "splits": "from the manifest" if "split" in {k for _, f in raw for k in f} else "random by group (seed)",
        "skipped_problems": len(problems) if skip_bad else 0,
    }
    return write_dataset(out, entries, info, copies)
