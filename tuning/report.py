"""What a finished sweep leaves behind: the results table, a learning-curve plot and Optuna's parameter importance."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from cman.metrics import VAL_METRIC
from tuning.space import trial_params

logger = logging.getLogger(__name__)
_NOT_PARAMS = {"trial", "trial_id", "status", "epochs", "path", f"last_{VAL_METRIC}", f"best_{VAL_METRIC}"}


def results_table(results) -> pd.DataFrame:
    """One row per trial (a Tune `ResultGrid`): id, status, the swept params, epochs run, last/best val rsum."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        curve = history[VAL_METRIC].dropna().tolist() if history is not None and VAL_METRIC in history else []
        metrics = result.metrics or {}
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or Path(result.path).name,
                "status": "ERROR" if result.error else "TERMINATED",
                **trial_params(result.config),
                "epochs": int(metrics.get("training_iteration") or len(curve)),
                f"last_{VAL_METRIC}": curve[-1] if curve else math.nan,
                f"best_{VAL_METRIC}": max(curve) if curve else math.nan,
                "path": result.path,
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # trial folders carry the creation index (tuning.sweep.trial_dirname; Tune's default names count from 1)
    table.insert(0, "trial", [trial_number(p, t) for p, t in zip(table["path"], table["trial_id"], strict=True)])
    return table.sort_values("trial").reset_index(drop=True)


def trial_number(path: str, trial_id: str) -> int:
    """0-based creation index of a trial (0 = the baseline point), from its Tune folder name."""
    name = Path(path).name
    ours = re.match(rf"trial_(\d+)_{re.escape(trial_id)}$", name)  # tuning.sweep.trial_dirname
    if ours:
        return int(ours.group(1))
    match = re.search(rf"_{re.escape(trial_id)}_(\d+)", name)  # Tune's default `<trainable>_<id>_<n>_<params>`
    return int(match.group(1)) - 1 if match else 10**6


def curves(results) -> dict[str, list[float]]:
    out = {}
    for result in results:
        history = result.metrics_dataframe
        if history is not None and VAL_METRIC in history:
            out[Path(result.path).name] = history[VAL_METRIC].dropna().tolist()
    return out


def plot_curves(curves_by_trial: dict[str, list[float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in sorted(curves_by_trial.items()):
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name.split("_")[-1])
    ax.set_xlabel("epoch (training iteration)")
    ax.set_ylabel("validation rsum")
    ax.set_title("val_rsum per trial (short lines: stopped early by ASHA)")
    ax.legend(fontsize="x-small", ncol=2, title="trial")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def param_columns(table: pd.DataFrame) -> list[str]:
    """The swept parameters' columns of a results table (`rank alpha margin lr` and any dotted config keys)."""
    return [c for c in table.columns if c not in _NOT_PARAMS]


def importance_study(table: pd.DataFrame) -> optuna.Study:
    """An Optuna study holding every finished trial (params + best val rsum), the same data the searcher saw.

    Integer, boolean and text parameters (rank, a layer count, a choice of names) are categorical; other numbers
    are float ranges, the learning rate on a log scale."""
    study = optuna.create_study(direction="maximize")
    finished = table.dropna(subset=[f"best_{VAL_METRIC}"])
    dists, kinds = {}, {}
    for name in param_columns(finished):
        values = finished[name].dropna().tolist()
        if not values:
            continue
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric and not all(float(v).is_integer() for v in values):
            low, high = min(values), max(values)
            dists[name] = optuna.distributions.FloatDistribution(low, high * (1 + 1e-9) + 1e-12, log=name == "lr")
            kinds[name] = float
        else:
            choices = sorted({_plain(v) for v in values}, key=str)
            dists[name] = optuna.distributions.CategoricalDistribution(choices)
            kinds[name] = _plain
    for row in finished.to_dict("records"):
        params = {name: kinds[name](row[name]) for name in dists}
        value = row[f"best_{VAL_METRIC}"]
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    return study


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones, integral floats as ints (a rank read back from pandas as 8.0)."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, float) and value.is_integer() else value


def param_importance(table: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    """fANOVA importance of each swept parameter for the best val rsum; empty if there is too little to compare."""
    if len(table.dropna(subset=[f"best_{VAL_METRIC}"])) < 2:
        return {}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        return dict(optuna.importance.get_param_importances(importance_study(table), evaluator=evaluator))
    except (ValueError, RuntimeError) as err:  # e.g. every trial used the same value of every parameter
        logger.info("parameter importance not computed: %s", err)
        return {}


def plot_importance(importance: dict[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importance)[::-1]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(names, [importance[n] for n in names])
    ax.set_xlabel("importance for best val_rsum (Optuna fANOVA)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results, output_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Write `tune_results.csv`, `val_rsum_curves.png` and `param_importance.png` (if computable) to `output_dir`."""
    table = results_table(results)
    csv = output_dir / "tune_results.csv"
    table.to_csv(csv, index=False)
    files = [csv, plot_curves(curves(results), output_dir / "val_rsum_curves.png")]
    importance = param_importance(table, seed)
    if importance:
        files.append(plot_importance(importance, output_dir / "param_importance.png"))
    return {"table": table, "files": files, "importance": importance}
