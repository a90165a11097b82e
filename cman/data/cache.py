"""Preprocessing cache: features computed once per (source files + processor config), stored memory-mapped.

Decoding a WAV, computing its fbank, or resizing and normalising an image costs far more CPU than a tiny encoder's
forward pass; done every epoch it bounds training. `FeatureCache` runs the processors once over a split and writes
each feature tensor of each modality as one `.npy` file (all items concatenated along the first axis, plus offsets),
which later runs and DataLoader workers read with `np.load(mmap_mode="r")`.

A cache directory is keyed by a hash of the processor configuration (tokenizer / feature extractor / image processor
serialisation + cman's own processor settings) and of every source (file path, size, mtime; caption text), so
editing a processor setting or touching a file selects a fresh directory: stale features are never read.

`audio_max_length` sizes a random-init AST from the data: fbank frames to cover a percentile of the clip durations,
rather than padding every clip to 10 s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from cman.data.dataset import Item
from cman.data.errors import DataError
from cman.data.processors import AudioProcessor, ImageProcessor, Processor, TextProcessor
from cman.modality import Modality

logger = logging.getLogger(__name__)

CACHE_FORMAT = "cman-feature-cache/1"
_INDEX = "index.json"
Features = dict[str, torch.Tensor]


# ---- keys --------------------------------------------------------------------------------------------------------
def processor_fingerprint(processor: Processor) -> dict[str, Any]:
    """Everything that decides a processor's output, as JSON-able data."""
    if isinstance(processor, TextProcessor):
        tok = processor.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:  # truncation/padding are per-call state that HF writes into the backend
            state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
            vocab = json.dumps(state, sort_keys=True)
        else:
            vocab = json.dumps(sorted(tok.get_vocab().items()))
        return {
            "kind": "text",
            "max_length": processor.max_length,
            "class": type(tok).__name__,
            "tokenizer_sha": hashlib.sha256(vocab.encode()).hexdigest(),
        }
    if isinstance(processor, AudioProcessor):
        out = {
            "kind": "audio",
            "max_seconds": processor.max_seconds,
            "class": type(processor.extractor).__name__,
            "extractor": json.loads(processor.extractor.to_json_string()),
        }
        if processor.normalize != "dataset":  # absent for the default, so existing caches keep their keys
            out["normalize"] = processor.normalize
        return out
    if isinstance(processor, ImageProcessor):
        return {
            "kind": "image",
            "class": type(processor.processor).__name__,
            "processor": json.loads(processor.processor.to_json_string()),
        }
    raise TypeError(f"no cache fingerprint for processor {type(processor).__name__}")


def _source_fingerprint(source: Any) -> list[Any]:
    if isinstance(source, Path):
        try:
            st = source.stat()
        except OSError:
            return [str(source.resolve()), None, None]  # missing file: an error entry, keyed by its path
        return [str(source.resolve()), st.st_size, st.st_mtime_ns]
    return ["text", str(source)]


def cache_key(items: Sequence[Item], modality: Modality, processor: Processor) -> str:
    """Hash of the processor config and the sources of `items` for `modality` (paths, sizes, mtimes; captions)."""
    digest = hashlib.sha256()
    header = {
        "format": CACHE_FORMAT,
        "modality": Modality(modality).value,
        "processor": processor_fingerprint(processor),
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for item in items:
        source = item.source(modality)
        if source is not None:
            digest.update(json.dumps([item.id, _source_fingerprint(source)]).encode())
    return digest.hexdigest()[:24]


# ---- the cache ---------------------------------------------------------------------------------------------------
class ModalityCache:
    """One modality's features of one item list, memory-mapped: `get(row)` → feature dict, or DataError."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        meta = json.loads((directory / _INDEX).read_text())
        self.rows: list[int | None] = meta["rows"]  # item position → row in the arrays (None: no source)
        self.errors: dict[str, str] = meta["errors"]  # item position → DataError message
        self.offsets = {k: np.asarray(v, dtype=np.int64) for k, v in meta["offsets"].items()}
        self.arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r") for k in meta["offsets"]}

    def get(self, index: int) -> Features | None:
        if str(index) in self.errors:
            raise DataError(self.errors[str(index)])
        row = self.rows[index]
        if row is None:
            return None
        out = {}
        for key, array in self.arrays.items():
            start, stop = self.offsets[key][row], self.offsets[key][row + 1]
            out[key] = torch.from_numpy(np.array(array[start:stop]))  # copy out of the read-only map
        return out


def _build(directory: Path, items: Sequence[Item], modality: Modality, processor: Processor) -> None:
    """Run `processor` over every item with this modality; write arrays + index atomically into `directory`."""
    rows: list[int | None] = []
    errors: dict[str, str] = {}
    parts: dict[str, list[np.ndarray]] = {}
    for position, item in enumerate(items):
        source = item.source(modality)
        if source is None:
            rows.append(None)
            continue
        try:
            features = processor.features(processor.load(source, item_id=item.id))
        except DataError as err:
            errors[str(position)] = str(err)
            rows.append(None)
            continue
        rows.append(sum(1 for r in rows if r is not None))
        for key, tensor in features.items():
            parts.setdefault(key, []).append(tensor.numpy())
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        offsets = {}
        for key, arrays in parts.items():
            lengths = [a.shape[0] if a.ndim else 1 for a in arrays]
            offsets[key] = [0, *np.cumsum(lengths).tolist()]
            np.save(tmp / f"{key}.npy", np.concatenate([np.atleast_1d(a) for a in arrays]))
        meta = {
            "format": CACHE_FORMAT,
            "modality": Modality(modality).value,
            "items": len(items),
            "rows": rows,
            "errors": errors,
            "offsets": offsets,
            "processor": processor_fingerprint(processor),
        }
        (tmp / _INDEX).write_text(json.dumps(meta, default=str))
        try:
            os.rename(tmp, directory)  # atomic; another process may have won the race, then its copy is used
        except OSError:
            if not (directory / _INDEX).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class FeatureCache:
    """Per-modality memory-mapped features of `items`, built on first use under `cache_dir`."""

    def __init__(self, cache_dir: str | Path, items: Sequence[Item], processors: dict[Modality, Processor]) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.modalities: dict[Modality, ModalityCache] = {}
        self.built: list[Modality] = []
        for modality, processor in processors.items():
            if not any(item.has(modality) for item in items):
                continue
            directory = self.directory(items, modality, processor)
            if not (directory / _INDEX).is_file():
                logger.info("building %s feature cache for %d items in %s", modality.value, len(items), directory)
                _build(directory, items, modality, processor)
                self.built.append(modality)
            self.modalities[modality] = ModalityCache(directory)

    def directory(self, items: Sequence[Item], modality: Modality, processor: Processor) -> Path:
        return self.cache_dir / f"{Modality(modality).value}-{cache_key(items, modality, processor)}"

    def features(self, index: int) -> dict[Modality, Features]:
        """The features of item `index`, as `CMANDataset.features` would compute them; DataError for a bad file."""
        out = {}
        for modality, cache in self.modalities.items():
            features = cache.get(index)
            if features is not None:
                out[modality] = features
        return out


# ---- data-sized audio --------------------------------------------------------------------------------------------
def audio_max_length(
    items: Sequence[Item],
    percentile: float = 99.0,
    max_seconds: float | None = None,
    hop_ms: float = 10.0,
    multiple: int = 16,
) -> int:
    """Fbank frames (10 ms hop) covering `percentile` % of the clips' durations (headers only), rounded up."""
    durations = []
    for item in items:
        if item.audio_path is None:
            continue
        try:
            durations.append(sf.info(str(item.audio_path)).duration)
        except (RuntimeError, OSError):  # bad files are reported by the loader / `cman data validate`
            continue
    if not durations:
        raise ValueError("no readable audio files to size the audio encoder from")
    seconds = float(np.percentile(durations, percentile))
    if max_seconds is not None:
        seconds = min(seconds, max_seconds)
    frames = math.ceil(seconds * 1000.0 / hop_ms)
    return max(multiple, math.ceil(frames / multiple) * multiple)


def fit_audio_length(config: Any, items: Sequence[Item]) -> Any:
    """`config` with a random-init AST sized to the data when `model.audio.length_percentile` is set.

    AST's position embeddings depend on `max_length`, so this only applies to a fresh model built from `init`; the
    resolved value is stored in the checkpoint's config, so evaluation and serving pad to the same length.
    """
    enc = config.model.audio
    if enc is None or enc.length_percentile is None or enc.init is None:
        return config
    if enc.init.get("model_type") != "audio-spectrogram-transformer":
        return config  # waveform models (HuBERT, wav2vec2) already get attention masks, no fixed length
    frames = audio_max_length(items, enc.length_percentile, enc.max_seconds)
    logger.info(
        "audio: AST max_length %d fbank frames (%.0fth percentile of %d clips)",
        frames,
        enc.length_percentile,
        len(items),
    )
    return config.with_overrides(
        {
            "model.audio.init.max_length": frames,
            "model.audio.max_length": frames,
            "model.audio.max_seconds": frames / 100.0,
        }
    )
