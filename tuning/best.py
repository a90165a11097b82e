"""Pick the sweep's best trial, copy its best checkpoint to `D/best`, evaluate it on the test split."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from cman.metrics import VAL_METRIC
from cman.training import evaluate_checkpoint, write_eval

logger = logging.getLogger(__name__)

SKIP_FILES = ("training_state.json", "training_state.safetensors")  # optimiser state: not needed to use the model


def best_checkpoint(result) -> tuple[Path, float]:
    """(checkpoint dir, val rsum) of a trial's best-scoring epoch whose checkpoint still exists, else its last one."""
    history = result.metrics_dataframe
    if history is None or "checkpoint_path" not in history:
        raise RuntimeError(f"trial {result.path} reported no checkpoint; nothing to keep")
    rows = history.dropna(subset=["checkpoint_path"]).sort_values(VAL_METRIC, ascending=False, kind="stable")
    for _, row in rows.iterrows():
        path = Path(str(row["checkpoint_path"]))
        if path.is_dir():
            return path, float(row[VAL_METRIC])
    # The Train run may have gone on after the last result Tune recorded (ASHA's stop reaches the trial a moment
    # later) and replaced those checkpoints by newer ones: take the best that the run itself kept.
    kept = sorted(Path(str(rows.iloc[0]["checkpoint_path"])).parent.glob("checkpoint_*"))
    scored = [(p, _checkpoint_rsum(p)) for p in kept if (p / "metadata.json").is_file()]
    if scored:
        return max(scored, key=lambda ps: ps[1])
    raise RuntimeError(f"none of the checkpoints trial {result.path} reported still exists (last: {rows.iloc[-1]})")


def _checkpoint_rsum(directory: Path) -> float:
    return float(json.loads((directory / "metadata.json").read_text()).get("metrics", {}).get("rsum", -math.inf))


def best_result(results):
    """The trial with the highest val rsum at any epoch (ASHA-stopped trials compete with what they reached)."""
    scored = [r for r in results if r.metrics_dataframe is not None and VAL_METRIC in r.metrics_dataframe]
    scored = [r for r in scored if not math.isnan(r.metrics_dataframe[VAL_METRIC].max())]
    if not scored:
        errors = [str(r.error).splitlines()[0] for r in results if r.error]
        detail = f"; first error: {errors[0]}" if errors else ""
        raise RuntimeError(f"no trial reported {VAL_METRIC} ({len(results)} trials){detail}")
    return max(scored, key=lambda r: r.metrics_dataframe[VAL_METRIC].max())


def copy_checkpoint(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*SKIP_FILES))
    return target


def evaluate_best(checkpoint: Path, split: str, root: str | None) -> dict[str, Any]:
    """Test metrics of `checkpoint`, also written to `<checkpoint>/eval_<split>.json`."""
    result = evaluate_checkpoint(checkpoint, split, root=root)
    write_eval(checkpoint, split, result)
    return result


def trial_id(result) -> str:
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name)
