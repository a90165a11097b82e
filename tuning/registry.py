"""MLflow for sweeps: the sweep experiment and parent run, one child run per trial, the `cman@champion` model.

Only the Tune driver process talks to MLflow (trial workers never do), so a sqlite store has a single writer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from ray.air.integrations.mlflow import MLflowLoggerCallback

from jobs.tracking import metric_name, resolve_tracking_uri
from tuning.space import trial_params

logger = logging.getLogger(__name__)

MODEL_NAME = "cman"
ALIAS = "champion"
PARENT_TAG = "mlflow.parentRunId"
SCORE_TAGS = ("test_rsum", "val_rsum")  # compared in this order when deciding whether a model beats the champion


def tracking_uri(config_uri: str | None, output_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else `config.mlflow.tracking_uri`, else sqlite under `output_dir`; always absolute."""
    return resolve_tracking_uri(config_uri, output_dir)


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[metric_name(key)] = float(value)
    return out


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """Experiment id of `name`, created with an absolute artifact location (sqlite stores need one) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    artifact_root.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())


def parent_run(client: MlflowClient, experiment_id: str, run_id: str | None, params: dict[str, Any]) -> str:
    """The sweep's parent run: reuse `run_id` (resume) if it still exists, else start a new one."""
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            return run_id
        except MlflowException:
            logger.warning("parent run %s not found in MLflow; starting a new one", run_id)
    run = client.create_run(experiment_id, run_name="sweep", tags={"cman.kind": "sweep"})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


class TrialLogger(MLflowLoggerCallback):
    """Ray's MLflow callback with CMAN's conventions.

    - params are the four searched values `rank alpha margin lr` (alpha derived from the sampled ratio);
    - metric names are made MLflow-safe (no `>` or `@`), non-numbers dropped, step = training iteration (epoch);
    - each run is a child of the sweep's parent run and tagged with its trial id, and a resumed sweep reopens the
      trial's existing run instead of starting a second one.
    """

    def log_trial_start(self, trial) -> None:
        if trial not in self._trial_runs:
            existing = self._find_run(trial.trial_id)
            if existing is not None:
                self._trial_runs[trial] = existing
                self.mlflow_util._get_client().update_run(existing, status="RUNNING")
            else:
                tags = {**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id}
                run = self.mlflow_util.start_run(tags=tags, run_name=str(trial))
                self._trial_runs[trial] = run.info.run_id
        run_id = self._trial_runs[trial]
        client = self.mlflow_util._get_client()
        logged = client.get_run(run_id).data.params
        for key, value in trial_params(trial.config).items():
            if key not in logged:
                client.log_param(run_id, key, value)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        step = int(result.get("training_iteration") or iteration)
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=numeric_metrics(result), step=step)

    def _find_run(self, trial_id: str) -> str | None:
        client = self.mlflow_util._get_client()
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return None
        runs = client.search_runs(
            [experiment.experiment_id], f"tags.trial_id = '{trial_id}'", run_view_type=ViewType.ACTIVE_ONLY
        )
        return runs[0].info.run_id if runs else None


def trial_runs(client: MlflowClient, experiment_id: str) -> dict[str, str]:
    """`{trial_id: run_id}` of the experiment's trial runs."""
    runs = client.search_runs([experiment_id], "tags.trial_id != ''", max_results=10_000)
    return {r.data.tags["trial_id"]: r.info.run_id for r in runs}


# ---- model registry --------------------------------------------------------------------------------------------
def log_checkpoint(client: MlflowClient, run_id: str, checkpoint: Path) -> str:
    """Log `checkpoint` as the run's pyfunc model `model/` (jobs/mlflow_model.py), ready to register."""
    from jobs.mlflow_model import log_cman_model

    return log_cman_model(client, run_id, checkpoint, "model")


def champion(client: MlflowClient) -> Any | None:
    try:
        return client.get_model_version_by_alias(MODEL_NAME, ALIAS)
    except MlflowException:
        return None


def _score(tags: dict[str, str]) -> tuple[float, ...]:
    return tuple(float(tags.get(k, "-inf")) for k in SCORE_TAGS)


def register_best(client: MlflowClient, run_id: str, scores: dict[str, float]) -> dict[str, Any]:
    """Register `runs:/<run_id>/model` as a new version of `cman`; move `@champion` to it only if it scores higher.

    `scores` holds `test_rsum` (and `val_rsum`); they are stored as version tags, so the next sweep can compare.
    """
    tags = {k: f"{float(v):.6f}" for k, v in scores.items() if v is not None}
    version = mlflow.register_model(f"runs:/{run_id}/model", MODEL_NAME, tags=tags)
    current = champion(client)
    promoted = current is None or _score(tags) > _score(current.tags)
    if promoted:
        client.set_registered_model_alias(MODEL_NAME, ALIAS, version.version)
        logger.info("model %s version %s is now @%s (%s)", MODEL_NAME, version.version, ALIAS, tags)
    else:
        logger.info(
            "model %s version %s registered; @%s stays on version %s (%s >= %s)",
            MODEL_NAME,
            version.version,
            ALIAS,
            current.version,
            dict(current.tags),
            tags,
        )
    return {
        "name": MODEL_NAME,
        "version": version.version,
        "promoted": promoted,
        "champion_version": version.version if promoted else current.version,
    }
