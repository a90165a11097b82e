"""`cman tune`: a Ray Tune + Optuna (TPE) + ASHA sweep over LoRA rank/alpha, loss margin and learning rate.

Each Tune trial runs `train_driver`, which builds and fits a Ray Train `TorchTrainer` (jobs/train.py) whose
`TuneReportCallback` forwards every epoch's metrics (and the Train checkpoint path) to Tune. ASHA stops weak trials
after whole epochs; every trial is an MLflow child run of the sweep's parent run; the best trial's best checkpoint
is copied to `D/best`, evaluated on the test split and registered as MLflow model `cman` (alias `champion` if it
beats the current one).

`D` may be a storage URI (`jobs.storage`): Tune's experiment (`D/tune`) and the trials' Train runs
(`D/trials/<id>/ray_results`) then live there, and everything else in the local folder (`--local-dir`).
"""

from __future__ import annotations

import json
import logging
import posixpath
from pathlib import Path
from typing import Any

from cman.config import CMANConfig, ConfigError, from_dict
from cman.metrics import VAL_METRIC
from jobs import storage
from jobs.storage import RunLocation
from tuning.search import storage_url
from tuning.space import baseline_point, param_space, trial_config, trial_params, validate_space

logger = logging.getLogger(__name__)

MODE = "max"  # VAL_METRIC: higher is better
EXPERIMENT_DIR = "tune"  # Tune's experiment folder under the output directory (what --resume restores)
TRIALS_DIR = "trials"  # Ray Train runs (checkpoints), one per trial id
REPORT_EVERY_S = 120  # Tune's status table: at most every 2 minutes (and once at the end)
STATE_FILE = "sweep.json"  # MLflow ids, so a resumed sweep keeps logging into the same parent run

# The trial's driver (it only builds the TorchTrainer and waits) holds no CPU, only a token of memory: a driver holding
# CPU can deadlock a cluster that shrank (two trials' drivers on the one node left, neither's Train worker fits) —
# seen when a node was lost mid-sweep (tests/test_cluster.py). Tune rejects an empty request, hence the memory.
DRIVER_RESOURCES = {"cpu": 0, "gpu": 0, "memory": 100 * 2**20}


# ---- one trial ------------------------------------------------------------------------------------------------
def trial_resources(config: CMANConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """(Tune driver resources, Train overrides): the trial's Train workers share `tune.cpus_per_trial` /
    `gpus_per_trial`; the driver holds none (`DRIVER_RESOURCES`)."""
    tc, workers = config.tune, max(config.ray.num_workers, 1)
    per_worker = {"CPU": round(tc.cpus_per_trial / workers, 4)}
    if tc.gpus_per_trial:
        per_worker["GPU"] = round(tc.gpus_per_trial / workers, 4)
    overrides = {
        "ray.resources_per_worker": per_worker,
        "ray.use_gpu": tc.gpus_per_trial > 0,
        "training.num_threads": None,  # the worker's CPU share, rounded up (jobs.train.set_worker_threads)
    }
    return dict(DRIVER_RESOURCES), overrides


def check_trial_fits(config: CMANConfig, cluster: dict[str, float]) -> None:
    """A ConfigError if one trial needs more CPUs or GPUs than the whole (local) cluster has: Tune would wait forever
    for resources that never come (e.g. configs/demo.yaml's `tune.cpus_per_trial: 2` on a 1-CPU machine)."""
    tc = config.tune
    for key, need, have in (
        ("tune.cpus_per_trial", tc.cpus_per_trial, cluster.get("CPU", 0.0)),
        ("tune.gpus_per_trial", tc.gpus_per_trial, cluster.get("GPU", 0.0)),
    ):
        if need > have:
            raise ConfigError(
                f"{key}: {need:g} but this Ray has {have:g} in all, so no trial could ever start; "
                f"set --set {key}={have:g} (or less), or join a bigger cluster with --address"
            )


def fit_concurrency(config: CMANConfig, cluster: dict[str, float]) -> CMANConfig:
    """`config` with `tune.max_concurrent` lowered to the trials the (local) cluster can run at once, with a warning.

    Trials that do not all fit would only wait for each other's Train workers (their drivers hold no CPU), each
    retrying its worker group start: run them one after another instead."""
    tc = config.tune
    fits = [int(cluster.get("CPU", 0.0) // tc.cpus_per_trial)]
    if tc.gpus_per_trial:
        fits.append(int(cluster.get("GPU", 0.0) // tc.gpus_per_trial))
    at_once = max(1, min(fits))
    if tc.max_concurrent <= at_once:
        return config
    logger.warning(
        "tune.max_concurrent: %d trials of %g CPUs do not fit this Ray's %g CPUs at once; running %d at a time",
        tc.max_concurrent,
        tc.cpus_per_trial,
        cluster.get("CPU", 0.0),
        at_once,
    )
    return config.with_overrides({"tune.max_concurrent": at_once})


def train_driver(trial: dict[str, Any], base: dict[str, Any], where: RunLocation) -> None:
    """Tune trainable: fit one TorchTrainer with the trial's values; Train reports reach Tune per epoch.

    The Train run lives in `D/trials/<trial id>/ray_results` (in Ray's storage), so a restarted trial continues from
    its own latest checkpoint; the loop's local files go to `<local dir>/trials/<trial id>`. Per-epoch MLflow logging
    is the Tune driver's job here (`TrialLogger`), so the loop's own logging is off.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.launch import build_trainer, make_loop_config

    config = trial_config(from_dict(base), trial)
    trial_id = tune.get_context().get_trial_id()
    finished = finished_train_run(where, trial_id, config.training.epochs)
    if finished is not None:  # Tune restarted a trial whose Train run had already ended (driver killed in between)
        tune.report(finished)
        return
    trial_dir = where.local_dir / TRIALS_DIR / trial_id
    loop_config = {**make_loop_config(config, trial_dir, run=None), "log_epochs": False}
    ray_storage = where.ray_storage(TRIALS_DIR, trial_id, "ray_results")
    callbacks = [TuneReportCallback()]
    build_trainer(config, trial_dir, loop_config, callbacks=callbacks, loop=_tune_loop, ray_storage=ray_storage).fit()


def finished_train_run(where: RunLocation, trial_id: str, epochs: int) -> dict[str, Any] | None:
    """The final metrics (+ `checkpoint_path`) of the trial's Train run if it already trained all `epochs`, else None.

    Tune saves its state every few seconds: a sweep driver killed right after a trial ended can leave that trial
    recorded as running, and `--resume` starts it again. Its Train run then has nothing left to train and would
    report nothing, which Tune rejects; the trial reports its final epoch instead.
    """
    from cman.steps import flat_metrics

    kept = []
    for run_dir in storage.subdirs(where.fs, where.join(TRIALS_DIR, trial_id, "ray_results")):
        for directory in storage.subdirs(where.fs, run_dir, "checkpoint_"):
            meta = storage.read_json(where.fs, posixpath.join(directory, "metadata.json"))
            if meta is not None:
                kept.append((int(meta.get("epoch", 0)), directory, meta.get("metrics") or {}))
    if not kept:
        return None
    epoch, directory, metrics = max(kept, key=lambda k: k[0])
    if epoch < epochs or "rsum" not in metrics:
        return None
    return {**flat_metrics(metrics), "epoch": epoch, "checkpoint_path": str(directory)}


def _tune_loop(loop_config: dict[str, Any]) -> None:
    """jobs.train's loop, after noting the worker group's placement group for `ReleasePlacementGroups`."""
    import ray
    import ray.train

    from jobs.train import train_loop_per_worker
    from tuning.resources import PLACEMENT_GROUP_FILE

    group = ray.util.get_current_placement_group()
    if group is not None and ray.train.get_context().get_world_rank() == 0:
        path = Path(loop_config["output_dir"]) / PLACEMENT_GROUP_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:  # one line per worker group (a Train restart makes a new one)
            f.write(group.id.hex() + "\n")
    train_loop_per_worker(loop_config)


def trial_index(trial: Any) -> int:
    """0-based creation index of a trial (0 = the baseline point): Tune's `experiment_tag` starts with it, from 1."""
    head = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return int(head) - 1 if head.isdigit() else 0


def trial_name(trial: Any) -> str:
    """What Tune's table and MLflow call a trial: `trial_03 rank=16 lr=4.2e-4`, or its first two swept values."""
    params = trial_params(trial.config)
    shown = [k for k in ("rank", "lr") if k in params] or list(params)[:2]
    values = " ".join(f"{k.rsplit('.', 1)[-1]}={_short(params[k])}" for k in shown)
    return f"trial_{trial_index(trial):02d} {values}".rstrip()


def _short(value: Any) -> str:
    """`4.2e-04` for small or large floats, `0.25` otherwise; anything else as str."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3g}" if 1e-2 <= abs(value) < 1e3 else f"{value:.1e}"


def trial_dirname(trial: Any) -> str:
    """`trial_03_<trial id>`: the creation index first (what `tuning.report.trial_number` reads back)."""
    return f"trial_{trial_index(trial):02d}_{trial.trial_id}"


def _trainable(config: CMANConfig, where: RunLocation):
    from ray import tune

    driver_resources, overrides = trial_resources(config)
    base = config.with_overrides(overrides).to_dict()
    return tune.with_resources(tune.with_parameters(train_driver, base=base, where=where), driver_resources)


# ---- the Tuner ------------------------------------------------------------------------------------------------
def _reporter(config: CMANConfig):
    """Tune's classic status table with our columns. Tune's newer output engine (the default) ignores a passed
    reporter ("AIR_VERBOSITY is set, ignoring passed-in ProgressReporter") and prints every metric of every trial."""
    import os

    from ray.tune import CLIReporter

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # read by Tuner.fit in this (the driver) process

    named = {"rank": "rank", "alpha_ratio": "alpha/rank", "margin": "margin", "lr": "lr"}
    swept = baseline_point(config)
    return CLIReporter(
        parameter_columns={k: named.get(k, k.rsplit(".", 1)[-1]) for k in swept},
        metric_columns={"training_iteration": "epoch", "train_loss": "loss", VAL_METRIC: VAL_METRIC},
        max_report_frequency=REPORT_EVERY_S,
        sort_by_metric=True,  # by TuneConfig's metric and mode
    )


def build_tuner(config: CMANConfig, where: RunLocation, callbacks: list, study_name: str) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from jobs import cluster
    from tuning.search import make_searcher

    tc = config.tune
    searcher = make_searcher(config, study_name)
    epochs = config.training.epochs
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=min(tc.grace_period, epochs),
        reduction_factor=tc.reduction_factor,
    )
    tune_config = tune.TuneConfig(
        metric=VAL_METRIC,
        mode=MODE,
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=tc.num_samples,
        max_concurrent_trials=tc.max_concurrent,
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=EXPERIMENT_DIR,
        **where.ray_storage(),
        callbacks=callbacks,
        progress_reporter=_reporter(config),
        verbose=2 if cluster.is_verbose() else 1,  # 1: the status table every 30 s and the final table
        # a trial whose process died (its node lost) is started again, and its Train run resumes from its checkpoint
        failure_config=tune.FailureConfig(max_failures=config.ray.max_failures),
    )
    return tune.Tuner(
        _trainable(config, where), param_space=param_space(config), tune_config=tune_config, run_config=run_config
    )


def _fit(config: CMANConfig, where: RunLocation, resume: bool, callbacks: list, study_name: str):
    from ray import tune

    if resume:
        logger.info("resuming the sweep in %s", where.describe(EXPERIMENT_DIR))
        tuner = tune.Tuner.restore(
            where.join(EXPERIMENT_DIR),
            trainable=_trainable(config, where),
            resume_errored=True,
            storage_filesystem=_ray_fs(where),
        )
    else:
        tuner = build_tuner(config, where, callbacks, study_name)
    return tuner.fit()


def _ray_fs(where: RunLocation) -> Any:
    """The `storage_filesystem` Ray was given (None for a plain folder)."""
    return where.ray_storage().get("storage_filesystem")


def _finished_trials(where: RunLocation) -> int:
    """Trials that ended (TERMINATED or ERROR) in the experiment state Tune saved to disk.

    After an interrupt (Ctrl-C / SIGUSR1) the in-memory `ResultGrid` shows the trials Tune stopped on its way out
    as TERMINATED; the state saved before that still says RUNNING/PENDING, and it is what `--resume` continues.
    """
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(where.join(EXPERIMENT_DIR), storage_filesystem=_ray_fs(where))
    return sum(t.status in ("TERMINATED", "ERROR") for t in analysis.trials)


# ---- driver-side preparation ------------------------------------------------------------------------------------
def _check_output_dir(where: RunLocation, resume: bool) -> None:
    from ray import tune

    experiment = where.describe(EXPERIMENT_DIR)
    if resume and not tune.Tuner.can_restore(where.join(EXPERIMENT_DIR), storage_filesystem=_ray_fs(where)):
        raise ValueError(f"--resume: no sweep to resume in {where.output} (expected {experiment}); drop --resume")
    if not resume and where.exists(EXPERIMENT_DIR):
        raise ValueError(
            f"{where.output} already holds a sweep ({experiment}): pass --resume to continue it, "
            "or choose another --output-dir"
        )


def _absolute_paths(config: CMANConfig, output_dir: str) -> CMANConfig:
    """Tune and Train chdir into their own folders: make data.root and output_dir absolute."""
    overrides: dict[str, Any] = {"output_dir": output_dir}
    if config.data.root:
        overrides["data.root"] = str(Path(config.data.root).resolve())
    return config.with_overrides(overrides)


def _mlflow_setup(config: CMANConfig, output_dir: Path, resume: bool) -> dict[str, str]:
    """Tracking URI, the sweep experiment and its parent run (reused on resume); stored in D/sweep.json."""
    import mlflow
    from mlflow import MlflowClient

    from jobs import tracking

    uri = tracking.tracking_uri(config.mlflow.tracking_uri, output_dir)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    state_path = output_dir / STATE_FILE
    previous = json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
    name = previous.get("experiment") or f"{config.mlflow.experiment}-sweep-{output_dir.name}"
    experiment_id = tracking.ensure_experiment(client, name, output_dir / "mlartifacts")
    if resume:
        tracking.mark_interrupted_runs(client, experiment_id)
    sweep_params = {
        "num_samples": config.tune.num_samples,
        "max_concurrent": config.tune.max_concurrent,
        "epochs": config.training.epochs,
        "grace_period": config.tune.grace_period,
        "reduction_factor": config.tune.reduction_factor,
        "seed": config.tune.seed,
        "space": json.dumps(config.tune.space.model_dump(mode="json")),
    }
    parent = tracking.parent_run(client, experiment_id, previous.get("parent_run_id"), sweep_params)
    state = {"tracking_uri": uri, "experiment": name, "experiment_id": experiment_id, "parent_run_id": parent}
    output_dir.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=2))
    config.save(output_dir / "config.yaml")
    return state


# ---- after the trials -------------------------------------------------------------------------------------------
def _finish(config: CMANConfig, where: RunLocation, results, mlflow_state: dict[str, str]) -> dict[str, Any]:
    """Best trial → D/best (+ test eval), report files, MLflow parent artifacts, model registry (all local)."""
    from mlflow import MlflowClient

    from jobs import tracking
    from jobs.tracking.lineage import lineage_tags
    from tuning import best as best_mod
    from tuning.report import write_report

    client = MlflowClient(mlflow_state["tracking_uri"])
    parent = mlflow_state["parent_run_id"]
    output_dir = where.local_dir
    report = write_report(results, output_dir, seed=config.tune.seed)
    table = report["table"]
    winner = best_mod.best_result(results)
    source, val_rsum = best_mod.best_checkpoint(winner, where.fs)
    best_dir = best_mod.copy_checkpoint(source, output_dir / "best", where.fs)
    split, root = config.data.test_split, config.data.root
    test = best_mod.evaluate_best(best_dir, split, root)
    winner_id = best_mod.trial_id(winner)
    baseline_id = table["trial_id"].iloc[0]  # trial 0: the config's own values (points_to_evaluate)
    baseline = next(r for r in results if best_mod.trial_id(r) == baseline_id)
    if baseline_id == winner_id:
        baseline_test = test
    else:
        baseline_source = best_mod.best_checkpoint(baseline, where.fs)[0]
        baseline_test = best_mod.evaluate_stored(baseline_source, split, root, where.fs)
    runs = tracking.trial_runs(client, mlflow_state["experiment_id"])
    run_id = runs[winner_id]
    tracking.log_checkpoint(client, run_id, best_dir)
    scores, mc = {"test_rsum": test["rsum"], "val_rsum": val_rsum}, config.mlflow
    model = tracking.register_best(client, run_id, scores, lineage_tags(config, split), mc.registered_model, mc.alias)
    for path in [*report["files"], best_dir / f"eval_{split}.json"]:
        client.log_artifact(parent, str(path))
    summary_metrics = {
        "best_val_rsum": val_rsum,
        "best_test_rsum": test["rsum"],
        "baseline_test_rsum": baseline_test["rsum"],
        "n_trials": len(table),
        "n_stopped_early": int((table["epochs"] < config.training.epochs).sum()),
    }
    _close_parent(client, parent, summary_metrics, report["importance"], winner_id)
    return {
        "best_params": trial_params(winner.config),
        "best_trial_id": winner_id,
        "best_checkpoint": str(best_dir),
        "val_rsum": val_rsum,
        "test": test,
        "baseline": {
            "trial_id": baseline_id,
            "params": trial_params(baseline.config),
            "test_rsum": baseline_test["rsum"],
        },
        "n_trials": len(table),
        "n_stopped_early": summary_metrics["n_stopped_early"],
        "results_csv": str(output_dir / "tune_results.csv"),
        "importance": report["importance"],
        "model": model,
        "mlflow": {**mlflow_state, "best_run_id": run_id},
    }


def _close_parent(client: Any, parent: str, metrics: dict, importance: dict, winner_id: str) -> None:
    """The sweep's parent run: summary and importance metrics, the best trial's id; then FINISHED."""
    for key, value in metrics.items():
        client.log_metric(parent, key, float(value))
    for key, value in importance.items():
        client.log_metric(parent, f"importance_{key}", float(value))
    client.set_tag(parent, "best_trial_id", winner_id)
    client.set_terminated(parent, "FINISHED")


def _print_summary(summary: dict[str, Any]) -> None:
    from cman.metrics import format_table

    best = summary["best_params"]
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items())
    model = summary["model"]
    state = summary["mlflow"]
    print(f"\nsweep: {summary['n_trials']} trials ({summary['n_stopped_early']} stopped early by ASHA)")
    print(f"best trial {summary['best_trial_id']}: {params}  val rsum {summary['val_rsum']:.2f}")
    print(
        f"baseline (trial 0) test rsum {summary['baseline']['test_rsum']:.2f} -> best test rsum "
        f"{summary['test']['rsum']:.2f}"
    )
    print(format_table(summary["test"]))
    print(f"best checkpoint: {summary['best_checkpoint']}   results: {summary['results_csv']}")
    print(f"Ray results and checkpoints: {summary['storage']}")
    alias = model.get("alias", "champion")
    verdict = f"now @{alias}" if model["promoted"] else f"@{alias} stays on version {model['champion_version']}"
    print(f"registered model {model['name']} version {model['version']} ({verdict}): models:/{model['name']}@{alias}")
    print(f"MLflow: mlflow ui --backend-store-uri {state['tracking_uri']}   (experiment {state['experiment']})")
    if "optuna" in summary:
        print(f"Optuna: optuna-dashboard {summary['optuna']['storage']}   (study {summary['optuna']['study_name']})")


def run_sweep(
    config: CMANConfig,
    output_dir: str | Path,
    resume: bool = False,
    address: str | None = None,
    local_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or with `resume` continue) the sweep in `output_dir`; see the module docstring for what it leaves.

    `output_dir` is a folder or a storage URI; with a URI the local files go to `local_dir` (`jobs.storage.locate`).
    Returns the best trial's params and id, `best_checkpoint` (D/best), its `test` result, the baseline's test
    rsum, `n_trials`, the registered model version and the MLflow ids.
    """
    import ray

    from jobs import cluster
    from jobs.tracking import TrialLogger
    from tuning.resources import ReleasePlacementGroups

    where = storage.locate(output_dir, local_dir)
    local = where.local_dir
    validate_space(config)  # one clear ConfigError before Ray or MLflow start
    config = _absolute_paths(config, where.output)
    _check_output_dir(where, resume)
    started = cluster.connect(address)  # False when the caller (a test, a job) already runs Ray
    try:
        if started and cluster.cluster_address(address) is None:  # a local Ray: on a cluster, an autoscaler may add
            check_trial_fits(config, ray.cluster_resources())
            config = fit_concurrency(config, ray.cluster_resources())
        mlflow_state = _mlflow_setup(config, local, resume)
        study_name = f"{mlflow_state['experiment']}-{mlflow_state['parent_run_id'][:8]}"
        logger_cb = TrialLogger(
            tracking_uri=mlflow_state["tracking_uri"],
            experiment_id=mlflow_state["experiment_id"],
            tags={"mlflow.parentRunId": mlflow_state["parent_run_id"], "cman.kind": "trial"},
            base=config.with_overrides(trial_resources(config)[1]),
        )
        releaser = ReleasePlacementGroups(str(local / TRIALS_DIR))
        try:
            results = _fit(config, where, resume, [logger_cb, releaser], study_name)
        finally:  # finished, interrupted or failed: no worker group of the sweep outlives it
            releaser.settle()
        finished = _finished_trials(where)
        if finished < config.tune.num_samples:
            local_flag = f" --local-dir {local}" if where.remote else ""
            raise RuntimeError(
                f"sweep interrupted after {finished}/{config.tune.num_samples} trials; continue it with "
                f"`cman tune --config ... --output-dir {where.output}{local_flag} --resume`"
            )
        summary = _finish(config, where, results, mlflow_state)
    finally:
        if started:
            ray.shutdown()
    summary["storage"] = where.output
    if config.tune.optuna_storage:
        summary["optuna"] = {"storage": storage_url(config.tune.optuna_storage), "study_name": study_name}
    (local / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)
    return summary
