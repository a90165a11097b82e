"""All of CMAN's MLflow: tracking URI and experiments, `cman train` runs, sweep trial runs, the model registry.

- `store`: `tracking_uri` (the one place a URI is chosen), `ensure_experiment`, `metric_name`;
- `runs`: the run of a `cman train` output directory (`open_run`, `log_metrics`, `finish_run`), with `plots`;
- `tune_callback`: the sweep's parent run and `TrialLogger`, one run per Tune trial;
- `registry`: `log_checkpoint`, `register_best` and the `cman@champion` alias.
"""

from jobs.tracking.plots import write_plots
from jobs.tracking.registry import ALIAS, MODEL_NAME, champion, log_checkpoint, register_best
from jobs.tracking.runs import (
    RUN_FILE,
    Tracking,
    fail_run,
    finish_run,
    log_metrics,
    log_params,
    metric_steps,
    open_run,
)
from jobs.tracking.store import ensure_experiment, metric_name, numeric_metrics, tracking_uri
from jobs.tracking.tune_callback import TrialLogger, mark_interrupted_runs, parent_run, trial_runs

__all__ = [
    "ALIAS",
    "MODEL_NAME",
    "RUN_FILE",
    "Tracking",
    "TrialLogger",
    "champion",
    "ensure_experiment",
    "fail_run",
    "finish_run",
    "log_checkpoint",
    "log_metrics",
    "log_params",
    "mark_interrupted_runs",
    "metric_name",
    "metric_steps",
    "numeric_metrics",
    "open_run",
    "parent_run",
    "register_best",
    "tracking_uri",
    "trial_runs",
    "write_plots",
]
