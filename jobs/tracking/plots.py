"""The training plots of a run, drawn from its MLflow metric history: train loss + val rsum, val recall@K."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from cman.metrics import DIRECTIONS, VAL_METRIC
from jobs.tracking.store import metric_name

RECALL_KS = ("R@1", "R@5", "R@10")


def write_plots(client: MlflowClient, run_id: str, out_dir: Path) -> list[Path]:
    """loss.png (train loss and val rsum per epoch) and recall.png (val R@K per direction), from the run's metrics."""
    import matplotlib  # here, not at import: a Ray Train worker imports jobs.tracking and never plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = {key: _history(client, run_id, key) for key in ("train_loss", VAL_METRIC)}
    fig, loss_ax = plt.subplots(figsize=(6, 4))
    loss_ax.plot(*series["train_loss"], marker="o", color="tab:blue", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_ylabel("train loss", color="tab:blue")
    rsum_ax = loss_ax.twinx()
    rsum_ax.plot(*series[VAL_METRIC], marker="s", color="tab:orange", label="val rsum")
    rsum_ax.set_ylabel("val rsum", color="tab:orange")
    fig.tight_layout()
    paths = [_save(fig, out_dir / "loss.png")]

    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True, sharey=True)
    for ax, direction in zip(axes.flat, DIRECTIONS, strict=True):
        for k in RECALL_KS:
            ax.plot(*_history(client, run_id, metric_name(f"val_{direction}_{k}")), marker=".", label=k)
        ax.set_title(direction)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
    axes[0, 0].set_ylabel("recall (%)")
    axes[1, 0].set_ylabel("recall (%)")
    axes[0, 0].legend()
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "recall.png"))
    return paths


def _history(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    latest = {m.step: m.value for m in points}  # a step logged twice (restart) counts once, last value wins
    return list(latest), list(latest.values())


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
