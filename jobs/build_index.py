"""Build the gallery indexes of a dataset split: one FAISS `GalleryIndex` per modality, for `cman index` / Serve.

Each modality is embedded on its own (a gallery item is one image, one clip or one caption), in batches, with a
progress bar. Media shared by several items (one Flickr8k image with 5 captions) become one gallery item.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from cman.data.dataset import CMANDataset, Collator, Item, load_split
from cman.index import GalleryIndex
from cman.modality import Modality
from cman.models.cman import CMAN
from cman.training import amp_dtype, compute_embeddings, resolve_device

logger = logging.getLogger(__name__)


def unique_items(items: list[Item], modality: Modality) -> list[Item]:
    """The first item of each distinct medium (`Item.key`), in dataset order."""
    seen: set[str] = set()
    out = []
    for item in items:
        if item.has(modality) and item.key(modality) not in seen:
            seen.add(item.key(modality))
            out.append(item)
    return out


def item_record(item: Item) -> dict[str, Any]:
    """What the index stores per item: id, caption and absolute media paths (absent fields are left out)."""
    record: dict[str, Any] = {"id": item.id, "group": item.group}
    if item.caption is not None:
        record["caption"] = item.caption
    if item.image_path is not None:
        record["image_path"] = str(Path(item.image_path).resolve())
    if item.audio_path is not None:
        record["audio_path"] = str(Path(item.audio_path).resolve())
    return record


def build_index(
    checkpoint: str | Path,
    split: str,
    out_dir: str | Path,
    root: str | Path | None = None,
    kind: str = "flat",
) -> dict[str, int]:
    """Embed `split` of the dataset (`root`, default: the checkpoint's data.root) and write `out_dir/<modality>/`.

    Also writes `out_dir/index_meta.json`. Returns the number of gallery items per modality.
    """
    start = time.perf_counter()
    checkpoint, out_dir = Path(checkpoint).resolve(), Path(out_dir).resolve()
    model = CMAN.from_pretrained(checkpoint).merge_adapters()
    config = model.config
    data_root = Path(root or config.data.root or "")
    if not str(root or config.data.root or ""):
        raise ValueError("no dataset root: pass root= (cman index --config with data.root set)")
    items = load_split(data_root, split)
    device = resolve_device(config.ray.use_gpu)
    model.to(device)
    dtype = amp_dtype(device, config.training.mixed_precision)
    counts: dict[str, int] = {}
    for modality in model.modalities:
        gallery = unique_items(items, modality)
        if not gallery:
            logger.warning("split %s has no %s; no %s index written", split, modality.value, modality.value)
            continue
        processors = {modality: model.processors[modality]}
        dataset = CMANDataset(gallery, processors, skip_bad_items=config.data.skip_bad_items)
        loader = DataLoader(
            dataset,
            batch_size=config.training.eval_batch_size,
            collate_fn=Collator(processors),
            num_workers=config.data.num_workers,
        )
        logger.info("embedding %d %s items of %s/%s", len(gallery), modality.value, data_root, split)
        embedded = compute_embeddings(model, loader, device, dtype, progress=True)[modality]
        by_key = {item.key(modality): item for item in gallery}
        index = GalleryIndex(embedded.embeddings.shape[1], kind=kind)
        index.add(embedded.embeddings, [item_record(by_key[key]) for key in embedded.keys])
        index.save(out_dir / modality.value)
        counts[modality.value] = len(index)
    meta = {
        "checkpoint": str(checkpoint),
        "split": split,
        "root": str(data_root.resolve()),
        "kind": kind,
        "items_in_split": len(items),
        "counts": counts,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out_dir / "index_meta.json").write_text(json.dumps(meta, indent=2))
    logger.info("index written to %s: %s (%.1f s)", out_dir, counts, time.perf_counter() - start)
    return counts
