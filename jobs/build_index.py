"""Build the gallery of a dataset split, or of a folder of media, for `cman index` / Serve: every item's vectors into
the gallery store (`serve.gallery_store`, default `sqlite:///INDEX_DIR/gallery.db`), then one cached FAISS snapshot per
modality (writing: `cman.gallery_build`).

Each modality is embedded on its own (a gallery item is one image, one clip or one caption), in batches, with a
progress bar. Media shared by several items (one Flickr8k image with 5 captions) become one gallery item. Building
into a directory that already holds a gallery updates it: unchanged items stay, changed ones are replaced, items
added online stay.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from cman.config import ServeConfig
from cman.data.dataset import CMANDataset, Collator, Item, load_split
from cman.data.folder import scan_folder
from cman.gallery_build import item_record, write_gallery, write_meta
from cman.modality import Modality
from cman.models.cman import CMAN
from cman.quantize import quantize_encoders
from cman.training import amp_dtype, compute_embeddings, resolve_device
from jobs import faults

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


def build_index(
    checkpoint: str | Path,
    split: str | None,
    out_dir: str | Path,
    root: str | Path | None = None,
    kind: str = "flat",
    serve: ServeConfig | None = None,
    progress: bool = True,
    folder: str | Path | None = None,
) -> dict[str, int]:
    """Single process: embed `split` (`root`, default: the checkpoint's data.root), or every medium under `folder`
    (`cman.data.folder`; then `split` and `root` are not used), into the gallery of `out_dir`.

    Also writes `out_dir/index_meta.json`. Returns the number of gallery items per modality. `progress`: a progress
    bar per modality (the quickstart's few-second index goes without).
    """
    start = time.perf_counter()
    checkpoint, out_dir = Path(checkpoint).resolve(), Path(out_dir).resolve()
    model = CMAN.from_pretrained(checkpoint).merge_adapters()
    config = model.config
    items, data_root, skip_bad = gallery_source(split, root, config, folder)
    device = resolve_device(config.ray.use_gpu)
    model.to(device)
    quantize = (serve or config.serve).quantize
    quantize_encoders(model, quantize, purpose="indexing")  # as the encoder replicas do (serve.quantize)
    dtype = amp_dtype(device, config.serve.dtype, purpose="indexing") if quantize == "none" else None
    galleries: dict[Modality, tuple[np.ndarray, list[dict]]] = {}
    for modality in model.modalities:
        gallery = unique_items(items, modality)
        if not gallery:
            logger.warning("%s has no %s; no %s index written", folder or split, modality.value, modality.value)
            continue
        processors = {modality: model.processors[modality]}
        dataset = CMANDataset(gallery, processors, skip_bad_items=skip_bad)
        loader = DataLoader(
            dataset,
            batch_size=config.training.eval_batch_size,
            collate_fn=Collator(processors),
            num_workers=config.data.num_workers,
        )
        logger.info("embedding %d %s items of %s", len(gallery), modality.value, folder or f"{data_root}/{split}")
        embedded = compute_embeddings(model, loader, device, dtype, progress=progress)[modality]
        by_key = {item.key(modality): item for item in gallery}
        records = [item_record(by_key[key], data_root) for key in embedded.keys]
        galleries[modality] = (embedded.embeddings, records)
    counts = write_gallery(out_dir, galleries, kind, serve)
    split = None if folder is not None else split
    extra = {"quantize": quantize, **_folder_meta(folder)}
    write_meta(out_dir, checkpoint, split, data_root, kind, len(items), counts, serve, **extra)
    logger.info("index written to %s: %s (%.1f s)", out_dir, counts, time.perf_counter() - start)
    return counts


def gallery_source(
    split: str | None, root: str | Path | None, config: Any, folder: str | Path | None
) -> tuple[list[Item], Path, bool]:
    """(items, the root their media lie under, whether to skip undecodable items) of a split or of a folder.

    A folder's files that cannot be decoded are skipped (logged): a photo folder holds what it holds; a dataset split
    follows `data.skip_bad_items` (`cman data validate` lists its problems first).
    """
    if folder is not None:
        return scan_folder(folder), Path(folder).resolve(), True
    if not split:
        raise ValueError("index a split (split=) or a folder (folder=)")
    data_root = _data_root(root, config)
    return load_split(data_root, split), data_root, config.data.skip_bad_items


def _folder_meta(folder: str | Path | None) -> dict[str, Any]:
    return {"folder": str(Path(folder).resolve())} if folder is not None else {}


def _data_root(root: str | Path | None, config: Any) -> Path:
    if not str(root or config.data.root or ""):
        raise ValueError("no dataset root: pass root= (cman index --config with data.root set)")
    return Path(root or config.data.root).resolve()


# ---- Ray Data -------------------------------------------------------------------------------------------------------
class EmbedActor:
    """Ray Data actor: one modality's LoRA-merged encoder + the fusion transformer, and that modality's processor
    (what the Serve encoder replica and the Retriever run), embedding a batch of item rows on its own."""

    def __init__(
        self,
        checkpoint: str,
        modality: str,
        num_threads: int,
        use_gpu: bool,
        skip_bad: bool | None = None,
        quantize: str = "none",
    ) -> None:
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.modality = Modality(modality)
        self.model = CMAN.from_pretrained(checkpoint, modalities=[self.modality]).merge_adapters()
        self.device = resolve_device(use_gpu)
        self.model.to(self.device)
        config = self.model.config
        quantize_encoders(self.model, quantize, purpose="indexing")
        self.dtype = amp_dtype(self.device, config.serve.dtype, purpose="indexing") if quantize == "none" else None
        self.processors = {self.modality: self.model.processors[self.modality]}
        self.skip_bad = config.data.skip_bad_items if skip_bad is None else skip_bad

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [_row_item(batch, i) for i in range(len(batch["key"]))]
        dataset = CMANDataset(items, self.processors, skip_bad_items=self.skip_bad)
        collated = Collator(self.processors)([dataset[i] for i in range(len(items))])
        embedded = compute_embeddings(self.model, [collated], self.device, self.dtype).get(self.modality)
        dim = self.model.config.model.embedding_dim
        vectors = np.zeros((len(items), dim), np.float32)  # (batch, dim); rows of skipped bad items stay zero
        ok = np.zeros(len(items), bool)
        if embedded is not None:
            row = {key: i for i, key in enumerate(batch["key"])}
            for key, vector in zip(embedded.keys, embedded.embeddings, strict=True):
                vectors[row[key]], ok[row[key]] = vector, True
        return {"shard": batch["shard"], "key": batch["key"], "embedding": vectors, "ok": ok}


def _row_item(batch: dict[str, np.ndarray], i: int) -> Item:
    def opt(name: str) -> str | None:
        value = str(batch[name][i])
        return value or None

    audio, image = opt("audio_path"), opt("image_path")
    return Item(
        id=str(batch["id"][i]),
        group=str(batch["group"][i]),
        caption=opt("caption"),
        audio_path=Path(audio) if audio else None,
        image_path=Path(image) if image else None,
    )


def shard_path(out_dir: Path, modality: Modality, shard: int) -> Path:
    return out_dir / "shards" / modality.value / f"shard-{shard:05d}.npz"


def build_index_ray(
    checkpoint: str | Path,
    split: str | None,
    out_dir: str | Path,
    root: str | Path | None = None,
    kind: str = "flat",
    serve: ServeConfig | None = None,
    address: str | None = None,
    progress: bool = True,
    folder: str | Path | None = None,
) -> dict[str, int]:
    """`build_index` on Ray Data: `map_batches` over an actor pool per modality, streamed into shards.

    Items go in shards of `serve.index_shard_size`; a shard is written (`out_dir/shards/<m>/shard-N.npz`, temp file +
    rename) once all its items are embedded, and a re-run skips shards already on disk. Actors, CPUs/GPUs per actor
    and the batch size come from `serve.index_*`. Then the shards are written into the gallery store.
    """
    start = time.perf_counter()
    serve = serve or ServeConfig()
    checkpoint, out_dir = Path(checkpoint).resolve(), Path(out_dir).resolve()
    meta = json.loads((checkpoint / "metadata.json").read_text())
    items, data_root, skip_bad = gallery_source(split, root, _checkpoint_config(checkpoint), folder)
    from jobs import cluster

    cluster.connect(address)
    size = serve.index_shard_size
    plan: dict[Modality, list[list[Item]]] = {}
    for modality in (Modality(m) for m in meta["base_models"]):
        gallery = unique_items(items, modality)
        if gallery:
            plan[modality] = [gallery[i : i + size] for i in range(0, len(gallery), size)]
        else:
            logger.warning("%s has no %s; no %s index written", folder or split, modality.value, modality.value)
    with ThreadPoolExecutor(max_workers=max(1, len(plan))) as pool:  # the modalities' actor pools run side by side
        jobs = [
            pool.submit(_embed_shards, checkpoint, m, shards, out_dir, serve, progress, skip_bad)
            for m, shards in plan.items()
        ]
        for job in jobs:
            job.result()
    galleries = {modality: _load_shards(out_dir, modality, shards, data_root) for modality, shards in plan.items()}
    counts = write_gallery(out_dir, galleries, kind, serve)
    split = None if folder is not None else split
    extra = {"quantize": serve.quantize, **_folder_meta(folder)}
    write_meta(out_dir, checkpoint, split, data_root, kind, len(items), counts, serve, **extra)
    logger.info("index written to %s: %s (%.1f s)", out_dir, counts, time.perf_counter() - start)
    return counts


def _checkpoint_config(checkpoint: Path) -> Any:
    from cman.config import load_config

    return load_config(checkpoint / "config.yaml")


def _embed_shards(
    checkpoint: Path,
    modality: Modality,
    shards: list[list[Item]],
    out_dir: Path,
    serve: ServeConfig,
    progress: bool,
    skip_bad: bool | None = None,
) -> None:
    import ray.data
    from tqdm import tqdm

    pending = [i for i in range(len(shards)) if not shard_path(out_dir, modality, i).is_file()]
    logger.info("%s: %d of %d shards to embed", modality.value, len(pending), len(shards))
    if not pending:
        return
    rows = [_item_row(i, item, modality) for i in pending for item in shards[i]]
    dataset = ray.data.from_items(rows).map_batches(
        EmbedActor,
        fn_constructor_args=(
            str(checkpoint),
            modality.value,
            int(serve.index_cpus_per_actor),
            serve.index_gpus_per_actor > 0,
            skip_bad,
            serve.quantize,
        ),
        batch_size=serve.index_batch_size,
        concurrency=serve.index_actors,
        num_cpus=serve.index_cpus_per_actor,
        num_gpus=serve.index_gpus_per_actor,
        batch_format="numpy",
    )
    done: dict[int, dict[str, tuple[np.ndarray, bool]]] = {}
    bar = tqdm(total=len(rows), desc=f"index {modality.value}", disable=not progress)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for shard, key, vector, ok in zip(batch["shard"], batch["key"], batch["embedding"], batch["ok"], strict=True):
            done.setdefault(int(shard), {})[str(key)] = (vector, bool(ok))
        bar.update(len(batch["key"]))
        for shard in [s for s, got in done.items() if len(got) == len(shards[s])]:
            faults.pause_point(f"index-{modality.value}-shard-{shard}")
            _write_shard(out_dir, modality, shard, shards[shard], done.pop(shard))
    bar.close()


def _item_row(shard: int, item: Item, modality: Modality) -> dict[str, Any]:
    return {
        "shard": shard,
        "key": item.key(modality),
        "id": item.id,
        "group": item.group,
        "caption": item.caption or "",
        "audio_path": str(item.audio_path or ""),
        "image_path": str(item.image_path or ""),
    }


def _write_shard(
    out_dir: Path, modality: Modality, shard: int, items: list[Item], got: dict[str, tuple[np.ndarray, bool]]
) -> None:
    keys = [item.key(modality) for item in items]
    path = shard_path(out_dir, modality, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            embeddings=np.stack([got[k][0] for k in keys]),  # (shard_items, dim)
            ok=np.array([got[k][1] for k in keys]),
            keys=np.array(keys),
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_shards(
    out_dir: Path, modality: Modality, shards: list[list[Item]], root: Path
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    vectors, records = [], []
    for i, items in enumerate(shards):
        with np.load(shard_path(out_dir, modality, i)) as shard:
            if list(shard["keys"]) != [item.key(modality) for item in items]:
                raise ValueError(
                    f"{shard_path(out_dir, modality, i)} holds other items (the split changed); delete "
                    f"{out_dir / 'shards'} and index again"
                )
            ok = shard["ok"]
            vectors.append(shard["embeddings"][ok])
            records.extend(item_record(item, root) for item, good in zip(items, ok, strict=True) if good)
    return np.concatenate(vectors), records
