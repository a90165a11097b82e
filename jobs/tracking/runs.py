"""MLflow tracking for `cman train`: one run per output directory, per-epoch metrics from rank 0, final artifacts.

The driver (`jobs.train.run_training`) opens the run before training and closes it after the test evaluation; the
rank-0 worker only logs per-epoch metrics into that run, so the sqlite store is never written from two processes at
once. A run restarted by Ray (FailureConfig) or re-run with the same output directory keeps logging into the same run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus

from cman.config import CMANConfig
from jobs.tracking.lineage import log_dataset
from jobs.tracking.plots import write_plots
from jobs.tracking.store import ensure_experiment, metric_name, numeric_metrics, tracking_uri

logger = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
MAX_PARAM_CHARS = 6000


@dataclass(frozen=True)
class Tracking:
    """Where a run lives; picklable, so it travels to the Ray workers inside the loop config."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


def open_run(config: CMANConfig, output_dir: Path, resume: bool = True) -> Tracking:
    """The MLflow run of `output_dir`: the one recorded there (when resuming and it still exists) or a new one."""
    output_dir = Path(output_dir).resolve()
    uri = tracking_uri(config.mlflow.tracking_uri, output_dir)
    client = MlflowClient(tracking_uri=uri)
    store_chosen = os.environ.get("MLFLOW_TRACKING_URI") or config.mlflow.tracking_uri
    artifact_root = None if store_chosen else output_dir / "mlartifacts"  # the default store keeps all under D
    experiment_id = ensure_experiment(client, config.mlflow.experiment, artifact_root)
    previous = _previous_run(output_dir, uri, client) if resume else None
    if previous is not None:
        client.update_run(previous, status=RunStatus.to_string(RunStatus.RUNNING))
        logger.info("continuing MLflow run %s (%s)", previous, uri)
        tracking = Tracking(uri, experiment_id, previous)
    else:
        run = client.create_run(experiment_id, run_name=output_dir.name, tags={"cman.output_dir": str(output_dir)})
        tracking = Tracking(uri, experiment_id, run.info.run_id)
        log_params(tracking, config.flat())
        log_dataset(client, tracking.run_id, config)
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
    log_run_params(tracking.client(), tracking.run_id, params)


def log_run_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """`params` as MLflow params (names made MLflow-safe, values cut at MAX_PARAM_CHARS), 100 per batch."""
    items = [Param(metric_name(k), str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(tracking: Tracking, metrics: dict[str, float], step: int) -> None:
    """Numeric metrics at `step` (the epoch); names made MLflow-safe."""
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items()]
    client = tracking.client()
    for start in range(0, len(items), 1000):
        client.log_batch(tracking.run_id, metrics=items[start : start + 1000])


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


def metric_steps(tracking: Tracking, key: str) -> list[int]:
    """Steps at which `key` was logged (in logging order), e.g. to check that no epoch was trained twice."""
    history = tracking.client().get_metric_history(tracking.run_id, metric_name(key))
    return [m.step for m in sorted(history, key=lambda m: m.timestamp)]
