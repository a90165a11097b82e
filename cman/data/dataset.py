"""Dataset in the seed layout: metadata JSON → items → per-modality features, and batch collation."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any

import torch
from torch.utils.data import Dataset

from cman.data.errors import DataError
from cman.data.layout import existing_metadata
from cman.data.processors import Processor
from cman.modality import Modality

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    id: str
    group: str
    caption: str | None = None
    audio_path: Path | None = None
    image_path: Path | None = None
    speaker: str | None = None

    def has(self, modality: Modality) -> bool:
        return self.source(modality) is not None

    def source(self, modality: Modality) -> Any:
        return {Modality.TEXT: self.caption, Modality.AUDIO: self.audio_path, Modality.IMAGE: self.image_path}[modality]

    def key(self, modality: Modality) -> str:
        """Media identity for gallery de-duplication (one image shared by 5 captions is one gallery item)."""
        if modality == Modality.TEXT:
            return f"text:{self.id}"
        return f"{modality.value}:{self.source(modality)}"


def load_split(root: str | Path, split: str, max_items: int | None = None) -> list[Item]:
    """Parse `<root>/metadata/<split>_metadata.json`; structural problems are errors naming file and entry."""
    path = existing_metadata(root, split)
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"metadata file {path} is not valid JSON: {err}", path=str(path)) from None
    if not isinstance(entries, list):
        raise DataError(f"metadata file {path} must hold a JSON list of items", path=str(path))
    items, seen = [], set()
    for index, entry in enumerate(entries[:max_items] if max_items else entries):
        items.append(_parse_entry(entry, index, Path(root), split, path))
        if items[-1].id in seen:
            raise DataError(f"metadata file {path}: duplicate id {items[-1].id!r} (entry {index})", path=str(path))
        seen.add(items[-1].id)
    return items


def _parse_entry(entry: Any, index: int, root: Path, split: str, path: Path) -> Item:
    if not isinstance(entry, dict) or "id" not in entry:
        raise DataError(f'metadata file {path}: entry {index} must be an object with an "id"', path=str(path))
    item_id = str(entry["id"])
    audio, image = entry.get("audio_filename"), entry.get("image_filename")
    caption = entry.get("caption")
    if caption is None and not audio and not image:
        raise DataError(
            f"metadata file {path}: item {item_id} has no caption, audio or image", item_id=item_id, path=str(path)
        )
    group = entry.get("group")
    return Item(
        id=item_id,
        group=str(group) if group is not None else f"id:{item_id}",
        caption=caption,
        audio_path=_confined(root / "audio" / split, audio, "audio_filename", item_id, path) if audio else None,
        image_path=_confined(root / "images" / split, image, "image_filename", item_id, path) if image else None,
        speaker=str(entry["speaker"]) if entry.get("speaker") is not None else None,
    )


def _confined(folder: Path, name: Any, field: str, item_id: str, path: Path) -> Path:
    """`folder / name`, refusing names that leave `folder` (absolute paths, `..`, backslashes)."""
    where = f"metadata file {path}: item {item_id}: {field} {name!r}"
    if not isinstance(name, str):
        raise DataError(f"{where} must be a string (a path relative to {folder})", item_id=item_id, path=str(path))
    relative = PurePath(name)
    if relative.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in relative.parts or "\\" in name:
        raise DataError(
            f"{where} must be a path inside {folder} (no absolute path, no '..'); move the file there",
            item_id=item_id,
            path=str(path),
        )
    return folder / relative


class CMANDataset(Dataset):
    """Items → {"id", "group", "features": {modality: tensors}}; bad items raise, or return None when skipping."""

    def __init__(
        self,
        items: list[Item],
        processors: dict[Modality, Processor],
        skip_bad_items: bool = False,
        cache: bool = False,
        store: Any | None = None,
        augment: Callable[[dict[str, Any] | None], dict[str, Any] | None] | None = None,
    ) -> None:
        self.items = items
        self.processors = processors
        self.skip_bad_items = skip_bad_items
        self.store = store  # a cman.data.cache.FeatureCache of `items`: features read, not recomputed
        self._cache: dict[int, dict[str, Any] | None] | None = {} if cache else None
        self.augment = augment  # training only (cman.data.augment): applied after the caches, on a copy

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if self._cache is None:
            row = self._load(index)
        else:
            if index not in self._cache:
                self._cache[index] = self._load(index)
            row = self._cache[index]
        return self.augment(row) if self.augment is not None else row

    def _load(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        try:
            features = self.store.features(index) if self.store is not None else self.features(item)
            keys = {m: item.key(m) for m in features}
            return {"id": item.id, "group": item.group, "keys": keys, "features": features}
        except DataError as err:
            if not self.skip_bad_items:
                raise
            logger.warning("skipping bad item: %s", err)
            return None

    def features(self, item: Item) -> dict[Modality, dict[str, torch.Tensor]]:
        out = {}
        for modality, proc in self.processors.items():
            source = item.source(modality)
            if source is not None:
                out[modality] = proc.features(proc.load(source, item_id=item.id))
        return out


def problems_in_split(items: list[Item], processors: dict[Modality, Processor]) -> list[str]:
    """Every problem in `items` (decode + preprocess each file), one message per bad file."""
    problems = []
    for item in items:
        for modality, proc in processors.items():
            source = item.source(modality)
            if source is None:
                continue
            try:
                proc.features(proc.load(source, item_id=item.id))
            except DataError as err:
                problems.append(str(err))
    return problems


class Collator:
    """Stack features per modality over the rows that have it; groups become batch-local integer ids."""

    def __init__(self, processors: dict[Modality, Processor]) -> None:
        self.processors = processors

    def __call__(self, rows: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [r for r in rows if r is not None]
        group_ids: dict[str, int] = {}
        groups = torch.tensor([group_ids.setdefault(r["group"], len(group_ids)) for r in good], dtype=torch.long)
        batch: dict[str, Any] = {
            "ids": [r["id"] for r in good],
            "group_names": [r["group"] for r in good],
            "groups": groups,  # (batch,)
            "skipped": len(rows) - len(good),
            "inputs": {},
            "present": {},
            "keys": {},
        }
        for modality, proc in self.processors.items():
            present = torch.tensor([modality in r["features"] for r in good], dtype=torch.bool)  # (batch,)
            if present.any():
                batch["inputs"][modality] = proc.collate(
                    [r["features"][modality] for r in good if modality in r["features"]]
                )
                batch["present"][modality] = present
                batch["keys"][modality] = [r["keys"][modality] for r in good if modality in r["features"]]
        return batch
