"""The sweep's best trial: its best checkpoint (read from Ray's storage) copied to `D/best` and tested."""

from __future__ import annotations

import logging
import math
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from cman.metrics import VAL_METRIC
from cman.training import evaluate_checkpoint, write_eval
from jobs import storage

logger = logging.getLogger(__name__)

SKIP_FILES = ("training_state.json", "training_state.safetensors")  # optimiser state: not needed to use the model


def best_checkpoint(result, fs: pafs.FileSystem | None = None) -> tuple[str, float]:
    """(checkpoint path on `fs`, val rsum) of a trial's best-scoring epoch whose checkpoint still exists, else the best
    one its Train run kept. `fs`: Ray's storage (`jobs.storage.RunLocation.fs`), default the local disk."""
    fs = fs or pafs.LocalFileSystem()
    history = result.metrics_dataframe
    if history is None or "checkpoint_path" not in history:
        raise RuntimeError(f"trial {result.path} reported no checkpoint; nothing to keep")
    rows = history.dropna(subset=["checkpoint_path"]).sort_values(VAL_METRIC, ascending=False, kind="stable")
    for _, row in rows.iterrows():
        path = str(row["checkpoint_path"])
        if storage.is_dir(fs, path):
            return path, float(row[VAL_METRIC])
    # The Train run may have gone on after the last result Tune recorded (ASHA's stop reaches the trial a moment
    # later) and replaced those checkpoints by newer ones: take the best that the run itself kept.
    run_dir = posixpath.dirname(str(rows.iloc[0]["checkpoint_path"]).rstrip("/"))
    scored = [(p, _checkpoint_rsum(fs, p)) for p in storage.subdirs(fs, run_dir, "checkpoint_")]
    scored = [(p, rsum) for p, rsum in scored if rsum is not None]
    if scored:
        return max(scored, key=lambda ps: ps[1])
    raise RuntimeError(f"none of the checkpoints trial {result.path} reported still exists (last: {rows.iloc[-1]})")


def _checkpoint_rsum(fs: pafs.FileSystem, directory: str) -> float | None:
    meta = storage.read_json(fs, posixpath.join(directory, "metadata.json"))
    return None if meta is None else float(meta.get("metrics", {}).get("rsum", -math.inf))


def best_result(results):
    """The trial with the highest val rsum at any epoch (ASHA-stopped trials compete with what they reached)."""
    scored = [r for r in results if r.metrics_dataframe is not None and VAL_METRIC in r.metrics_dataframe]
    scored = [r for r in scored if not math.isnan(r.metrics_dataframe[VAL_METRIC].max())]
    if not scored:
        errors = [str(r.error).splitlines()[0] for r in results if r.error]
        detail = f"; first error: {errors[0]}" if errors else ""
        raise RuntimeError(f"no trial reported {VAL_METRIC} ({len(results)} trials){detail}")
    return max(scored, key=lambda r: r.metrics_dataframe[VAL_METRIC].max())


def copy_checkpoint(source: str | Path, target: Path, fs: pafs.FileSystem | None = None) -> Path:
    """Copy the checkpoint `source` (on `fs`, default the local disk) to the local `target`, without optimiser state."""
    if fs is not None and not isinstance(fs, pafs.LocalFileSystem):
        return storage.download(fs, str(source), target, skip=SKIP_FILES)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*SKIP_FILES))
    return target


def evaluate_stored(source: str, split: str, root: str | None, fs: pafs.FileSystem | None = None) -> dict[str, Any]:
    """Test metrics of the checkpoint `source` on `fs` (downloaded to a temporary folder unless it is local)."""
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        return evaluate_checkpoint(source, split, root=root)
    with tempfile.TemporaryDirectory() as tmp:
        return evaluate_checkpoint(copy_checkpoint(source, Path(tmp) / "checkpoint", fs), split, root=root)


def evaluate_best(checkpoint: Path, split: str, root: str | None) -> dict[str, Any]:
    """Test metrics of `checkpoint`, also written to `<checkpoint>/eval_<split>.json`."""
    result = evaluate_checkpoint(checkpoint, split, root=root)
    write_eval(checkpoint, split, result)
    return result


def trial_id(result) -> str:
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name)
