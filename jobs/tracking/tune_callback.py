"""MLflow for sweeps: the sweep's parent run, one child run per trial (the `TrialLogger` Tune callback).

Only the Tune driver process talks to MLflow (trial workers never do), so a sqlite store has a single writer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, ViewType
from mlflow.exceptions import MlflowException
from ray.tune import Callback

from cman.config import CMANConfig
from jobs.tracking.lineage import log_dataset
from jobs.tracking.runs import log_run_params
from jobs.tracking.store import metric_name, numeric_metrics
from tuning.space import trial_config, trial_params

logger = logging.getLogger(__name__)


def parent_run(client: MlflowClient, experiment_id: str, run_id: str | None, params: dict[str, Any]) -> str:
    """The sweep's parent run: reuse `run_id` (resume) if it still exists, else start a new one."""
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "cman.resumed", "true")
            return run_id
        except MlflowException:
            logger.warning("parent run %s not found in MLflow; starting a new one", run_id)
    run = client.create_run(experiment_id, run_name="sweep", tags={"cman.kind": "sweep"})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def mark_interrupted_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark the runs of `experiment_id` still RUNNING as FAILED (tag `cman.interrupted`); returns their ids.

    Called when a sweep resumes: a run still RUNNING then belongs to a driver that died without closing it (SIGKILL,
    OOM, a lost machine). Runs of trials that the resumed sweep continues are reopened by `TrialLogger` (RUNNING
    again, tag `cman.resumed`) and finished normally; the others stay FAILED instead of RUNNING forever.
    """
    runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=10_000)
    for run in runs:
        client.set_tag(run.info.run_id, "cman.interrupted", "its sweep driver died; marked FAILED on --resume")
        client.set_terminated(run.info.run_id, status="FAILED")
    if runs:
        logger.info("marked %d MLflow run(s) of the interrupted sweep as FAILED", len(runs))
    return [run.info.run_id for run in runs]


class TrialLogger(Callback):
    """One MLflow run per Tune trial, written from the Tune driver (the only process that writes the store).

    - run name = Tune's trial name (`trial_03 rank=16 lr=4.2e-4`), tags `trial_id` and the sweep's parent run;
    - params are the swept values (`rank alpha margin lr`, alpha derived from the sampled ratio, and any dotted
      config keys of `tune.space`) and, given `base`, the trial's whole resolved config (`config.flat()` keys, and
      `config.yaml` as an artifact: what `cman train --config` would need to rerun the trial);
    - metric names are made MLflow-safe (no `>` or `@`), non-numbers dropped, step = training iteration (epoch),
      all of an epoch's metrics in one `log_batch` call;
    - a resumed sweep reopens the trial's existing run instead of starting a second one, and logs only epochs that
      run does not hold yet (a restarted trial may report an epoch again: each epoch stays logged once).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, tags: dict[str, str], base: CMANConfig | None = None):
        self.tracking_uri, self.experiment_id, self.tags = tracking_uri, experiment_id, tags
        self.base = base
        self.runs: dict[str, str] = {}  # trial id -> run id
        self.last_epoch: dict[str, int] = {}  # run id -> last epoch it holds

    def __getstate__(self) -> dict:  # Tune checkpoints its callbacks; the client is rebuilt on use
        return {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "tags": self.tags,
            "base": self.base,
            "runs": {},
            "last_epoch": {},
        }

    def client(self) -> MlflowClient:
        """One client per callback object (a new MlflowClient opens a new SQLAlchemy engine: ~0.9 s on sqlite,
        which Tune reported as a slow `on_trial_result`)."""
        if getattr(self, "_client", None) is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        client = self.client()
        run_id = self.runs.get(trial.trial_id) or self._find_run(client, trial.trial_id)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "cman.resumed", "true")
            self.last_epoch[run_id] = int(client.get_run(run_id).data.metrics.get("epoch", 0))
        else:
            tags = {**self.tags, "trial_name": str(trial), "trial_id": trial.trial_id}
            run_id = client.create_run(self.experiment_id, run_name=str(trial), tags=tags).info.run_id
        self.runs[trial.trial_id] = run_id
        logged = client.get_run(run_id).data.params
        values = dict(trial_params(trial.config))
        if self.base is not None and not logged:
            resolved = trial_config(self.base, trial.config)
            values = {**resolved.flat(), **values}
            client.log_text(run_id, yaml.safe_dump(resolved.to_dict(), sort_keys=False), "config.yaml")
            log_dataset(client, run_id, resolved)
        log_run_params(client, run_id, {k: v for k, v in values.items() if metric_name(k) not in logged})

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        step, now = int(result.get("epoch") or result.get("training_iteration") or iteration), int(time.time() * 1000)
        if step <= self.last_epoch.get(run_id, 0):
            return
        self.last_epoch[run_id] = step
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        self.client().log_batch(run_id, metrics=metrics, synchronous=False)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, "FAILED")

    def on_experiment_end(self, trials: list, **info) -> None:
        mlflow.flush_async_logging()

    def _end(self, trial, status: str) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is not None:
            mlflow.flush_async_logging()
            self.client().set_terminated(run_id, status=status)

    def _find_run(self, client: MlflowClient, trial_id: str) -> str | None:
        runs = client.search_runs(
            [self.experiment_id], f"tags.trial_id = '{trial_id}'", run_view_type=ViewType.ACTIVE_ONLY
        )
        return runs[0].info.run_id if runs else None


def trial_runs(client: MlflowClient, experiment_id: str) -> dict[str, str]:
    """`{trial_id: run_id}` of the experiment's trial runs."""
    runs = client.search_runs([experiment_id], "tags.trial_id != ''", max_results=10_000)
    return {r.data.tags["trial_id"]: r.info.run_id for r in runs}
