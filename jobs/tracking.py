"""MLflow tracking for `cman train`: one run per output directory, per-epoch metrics from rank 0, final artifacts.

The driver (`jobs.train.run_training`) opens the run before training and closes it after the test evaluation; the
rank-0 worker only logs per-epoch metrics into that run, so the sqlite store is never written from two processes at
once. A run restarted by Ray (FailureConfig) or re-run with the same output directory keeps logging into the same run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from cman.config import CMANConfig  # noqa: E402
from cman.metrics import DIRECTIONS  # noqa: E402

logger = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
MAX_PARAM_CHARS = 6000
RECALL_KS = ("R@1", "R@5", "R@10")
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- ]")


def metric_name(name: str) -> str:
    """MLflow-safe metric/param name: `val_text->image_R@1` → `val_text_to_image_R_at_1`."""
    return _BAD_NAME_CHARS.sub("_", name.replace("->", "_to_").replace("@", "_at_"))


@dataclass(frozen=True)
class Tracking:
    """Where a run lives; picklable, so it travels to the Ray workers inside the loop config."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


def tracking_uri(config: CMANConfig, output_dir: Path) -> tuple[str, str | None]:
    """MLFLOW_TRACKING_URI, else config.mlflow.tracking_uri, else an absolute sqlite store under `output_dir`.

    Returns the URI and the artifact location to give new experiments (only for the default local store).
    """
    if os.environ.get("MLFLOW_TRACKING_URI") or config.mlflow.tracking_uri:
        return resolve_tracking_uri(config.mlflow.tracking_uri, output_dir), None
    output_dir = Path(output_dir).resolve()
    return resolve_tracking_uri(None, output_dir), (output_dir / "mlartifacts").as_uri()


def resolve_tracking_uri(config_uri: str | None, output_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else `config_uri`, else sqlite under `output_dir`; sqlite paths made absolute
    (Tune chdirs into trial folders, so a relative store would split per trial)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    if not uri:
        return f"sqlite:///{(Path(output_dir) / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:  # a bare path: a sqlite file
        return f"sqlite:///{Path(uri).resolve()}"
    return uri


def open_run(config: CMANConfig, output_dir: Path, resume: bool = True) -> Tracking:
    """The MLflow run of `output_dir`: the one recorded there (when resuming and it still exists) or a new one."""
    output_dir = Path(output_dir).resolve()
    uri, artifact_location = tracking_uri(config, output_dir)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(config.mlflow.experiment, artifact_location=artifact_location)
    )
    previous = _previous_run(output_dir, uri, client) if resume else None
    if previous is not None:
        client.update_run(previous, status=RunStatus.to_string(RunStatus.RUNNING))
        logger.info("continuing MLflow run %s (%s)", previous, uri)
        tracking = Tracking(uri, experiment_id, previous)
    else:
        run = client.create_run(experiment_id, run_name=output_dir.name, tags={"cman.output_dir": str(output_dir)})
        tracking = Tracking(uri, experiment_id, run.info.run_id)
        log_params(tracking, config.flat())
        logger.info("MLflow run %s in experiment %r (%s)", tracking.run_id, config.mlflow.experiment, uri)
    (output_dir / RUN_FILE).write_text(json.dumps(asdict(tracking)))
    return tracking


def _previous_run(output_dir: Path, uri: str, client: MlflowClient) -> str | None:
    path = output_dir / RUN_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    if recorded.get("tracking_uri") != uri:
        return None
    try:
        return client.get_run(recorded["run_id"]).info.run_id
    except Exception:  # deleted run or another store: start a new one
        return None


def log_params(tracking: Tracking, params: dict[str, Any]) -> None:
    items = [Param(metric_name(k), str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    client = tracking.client()
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(tracking.run_id, params=items[start : start + 100])


def log_metrics(tracking: Tracking, metrics: dict[str, float], step: int) -> None:
    """Numeric metrics at `step` (the epoch); names made MLflow-safe."""
    import time

    now = int(time.time() * 1000)
    items = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items() if _is_number(v)]
    client = tracking.client()
    for start in range(0, len(items), 1000):
        client.log_batch(tracking.run_id, metrics=items[start : start + 1000])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def finish_run(tracking: Tracking, report: dict[str, Any], best_dir: Path, status: str = "FINISHED") -> None:
    """Log the test table, the best checkpoint and the training plots; close the run."""
    client = tracking.client()
    test = report["test"]
    test_metrics = {"test_rsum": test["rsum"]}
    for direction, values in test["directions"].items():
        test_metrics.update({f"test_{direction}_{k}": v for k, v in values.items()})
    log_metrics(tracking, test_metrics, step=len(report["history"]))
    client.log_dict(tracking.run_id, {"split": test.get("split", "test"), **test}, "eval_test.json")
    client.log_artifacts(tracking.run_id, str(best_dir), "checkpoint_best")
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_plots(client, tracking.run_id, Path(tmp)):
            client.log_artifact(tracking.run_id, str(path), "plots")
    client.set_terminated(tracking.run_id, status=status)


def fail_run(tracking: Tracking) -> None:
    tracking.client().set_terminated(tracking.run_id, status="FAILED")


def write_plots(client: MlflowClient, run_id: str, out_dir: Path) -> list[Path]:
    """loss.png (train loss and val rsum per epoch) and recall.png (val R@K per direction), from the run's metrics."""
    series = {key: _history(client, run_id, key) for key in ("train_loss", "val_rsum")}
    fig, loss_ax = plt.subplots(figsize=(6, 4))
    loss_ax.plot(*series["train_loss"], marker="o", color="tab:blue", label="train loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_ylabel("train loss", color="tab:blue")
    rsum_ax = loss_ax.twinx()
    rsum_ax.plot(*series["val_rsum"], marker="s", color="tab:orange", label="val rsum")
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def metric_steps(tracking: Tracking, key: str) -> list[int]:
    """Steps at which `key` was logged (in logging order), e.g. to check that no epoch was trained twice."""
    history = tracking.client().get_metric_history(tracking.run_id, metric_name(key))
    return [m.step for m in sorted(history, key=lambda m: m.timestamp)]


__all__ = [
    "Tracking",
    "fail_run",
    "finish_run",
    "log_metrics",
    "log_params",
    "metric_name",
    "metric_steps",
    "open_run",
    "tracking_uri",
    "write_plots",
]
