"""Ray Tune + Optuna + ASHA sweep (tuning/): real Ray, real sqlite MLflow, a tiny model on a tiny demo dataset.

One sweep of 3 trials is interrupted after its second trial and resumed; the tests then check what it left: the
trial count, ASHA's early stop, the MLflow child runs and the `cman@champion` model. The sweep's `--output-dir` is a
storage URI (`file:///<tmp>/store/sweep`: the code path of s3:// or gs://, a pyarrow filesystem handed to Ray) with
its local files in a separate folder, and its Optuna study in an RDB storage (`tune.optuna_storage`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import held_placement_groups
from tiny import REPO, tiny_config

from cman.config import ConfigError

EPOCHS = 2
N_TRIALS = 3
SIZES = {"training.batch_size": 16, "training.eval_batch_size": 32, "training.epochs": EPOCHS}


@pytest.fixture(scope="module")
def tune_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cman.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("tune_data")
    generate_demo_dataset(root, seed=0, counts={"train": 48, "val": 24, "test": 24})
    return root


def _interrupt_when_trial_starts(experiment: Path, n: int, stop: threading.Event) -> None:
    """SIGUSR1 (what Tune treats like Ctrl-C) to this process once trial number `n` (1-based) has a folder."""
    while not stop.is_set():
        if experiment.is_dir() and len([p for p in experiment.glob("trial_*") if p.is_dir()]) >= n:
            signal.raise_signal(signal.SIGUSR1)
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def sweep(ray_session, tune_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 trials, one at a time; later trials search tiny learning rates so ASHA has something to stop.
    Interrupted when the third trial starts, then resumed with `resume=True`. Ray's files go to `store` (given as a
    file:// URI), everything else to `out` (the local dir)."""
    from tuning.sweep import run_sweep

    base = tmp_path_factory.mktemp("sweep")
    out, store = base / "local", base / "store" / "sweep"
    db = base / "mlflow.db"
    config = tiny_config(
        tune_root,
        SIZES,
        **{
            "tune.num_samples": N_TRIALS,
            "tune.max_concurrent": 1,
            "tune.cpus_per_trial": 1,
            "tune.grace_period": 1,
            "tune.reduction_factor": 2,
            "tune.space.learning_rate": [1e-8, 1e-7],
            "tune.space.rank": [4, 8],
            "tune.space.model.fusion.layers": {"choice": [1, 2]},  # any dotted config key can be swept
            "mlflow.tracking_uri": f"sqlite:///{db}",
            "tune.optuna_storage": f"sqlite:///{base / 'optuna.db'}",
        },
    )
    start = time.perf_counter()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # never let a late signal kill the test process
    stop = threading.Event()
    watcher = threading.Thread(target=_interrupt_when_trial_starts, args=(store / "tune", N_TRIALS, stop), daemon=True)
    watcher.start()
    try:
        with pytest.raises(RuntimeError, match="interrupted after 2/3 trials"):
            run_sweep(config, store.as_uri(), local_dir=out)
        held = {"after the interrupt": held_placement_groups()}
        before = {p.name: _rows(p / "progress.csv") for p in (store / "tune").glob("trial_*")}
        summary = run_sweep(config, store.as_uri(), local_dir=out, resume=True)
        held["after the resumed sweep"] = held_placement_groups()
    finally:
        stop.set()
        signal.signal(signal.SIGUSR1, previous)
    print(f"\ninterrupted + resumed sweep of {N_TRIALS} trials: {time.perf_counter() - start:.0f} s")
    return {
        "summary": summary,
        "out": out,
        "store": store,
        "config": config,
        "before": before,
        "held": held,
        "uri": f"sqlite:///{db}",
        "optuna": config.tune.optuna_storage,
    }


def _rows(csv: Path) -> int:
    return len(csv.read_text().splitlines()) - 1 if csv.is_file() else 0


@pytest.mark.ray
def test_resumed_sweep_runs_exactly_n_trials(sweep: dict) -> None:
    import pandas as pd

    out, summary = sweep["out"], sweep["summary"]
    table = pd.read_csv(out / "tune_results.csv")
    assert summary["n_trials"] == N_TRIALS == len(table)
    assert table["trial"].tolist() == list(range(N_TRIALS))
    assert (table["status"] == "TERMINATED").all()
    # trials 0 and 1 finished before the interrupt and were not trained again after the resume
    for row in table.iloc[:2].itertuples():
        name = Path(row.path).name
        assert sweep["before"][name] == row.epochs == _rows(sweep["store"] / "tune" / name / "progress.csv")
    # trial 0 is the config's own values
    base = sweep["config"]
    assert table.loc[0, ["rank", "alpha", "margin", "lr"]].tolist() == pytest.approx(
        [base.peft.rank, base.peft.alpha, base.loss.margin, base.training.learning_rate]
    )
    for name in ("val_rsum_curves.png", "best/eval_test.json", "best/config.yaml", "sweep_summary.json"):
        assert (out / name).is_file(), name


@pytest.mark.ray
def test_no_placement_group_outlives_the_sweep(sweep: dict) -> None:
    """The interrupt lands while the third trial's Train workers start (before its loop could record their group):
    with no dashboard, Ray Train's own cleaner cannot run, and only `ReleasePlacementGroups` frees the CPUs."""
    assert sweep["held"] == {"after the interrupt": {}, "after the resumed sweep": {}}


@pytest.mark.ray
def test_a_pending_worker_group_is_removed_at_the_end_of_the_sweep(ray_session, tmp_path: Path) -> None:
    """CI failure (stop 20): the interrupted trial's workers' group was still PENDING (the previous trial's CPUs not
    yet released) when the sweep ended, was skipped, was placed a moment later and held its CPUs until the job ended.
    A worker-shaped group that existed before the sweep is left alone."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from tuning.resources import ReleasePlacementGroups

    bundle = {"CPU": round(ray.available_resources()["CPU"], 4)}  # everything free: a second one cannot be placed
    before = placement_group([bundle])
    ray.get(before.ready(), timeout=30)
    releaser = ReleasePlacementGroups(str(tmp_path), delay_s=0.2)
    releaser.setup()
    pending = placement_group([bundle])
    try:
        assert ray.util.placement_group_table(pending)["state"] == "PENDING"
        assert releaser.settle(timeout_s=30) == [pending.id.hex()]
        assert ray.util.placement_group_table(pending)["state"] == "REMOVED"
        assert ray.util.placement_group_table(before)["state"] == "CREATED"
    finally:
        for group in (pending, before):
            if ray.util.placement_group_table(group)["state"] != "REMOVED":
                remove_placement_group(group)


@pytest.mark.ray
def test_storage_uri_holds_ray_files_and_local_files_stay_apart(sweep: dict) -> None:
    """Ray's experiment and every trial's Train checkpoints are in the store; MLflow, reports and `best/` are local;
    no checkpoint or `file:` folder is made locally; the Optuna study holds exactly the sweep's trials (the baseline
    was not queued a second time by the resume)."""
    import optuna
    import pandas as pd

    from cman.config import load_config

    out, store = sweep["out"], sweep["store"]
    table = pd.read_csv(out / "tune_results.csv")
    assert (store / "tune").is_dir()
    for trial_id in table["trial_id"]:
        assert list((store / "trials" / trial_id / "ray_results").glob("*/checkpoint_*/metadata.json")), trial_id
    for name in ("sweep.json", "sweep_summary.json", "best/eval_test.json", "best/config.yaml"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("checkpoint_*")) and not (out / "tune").exists()
    assert not [p for p in out.parent.rglob("*") if p.name.endswith(":")]
    assert load_config(out / "config.yaml").output_dir == store.as_uri()
    summary = sweep["summary"]
    assert summary["storage"] == store.as_uri()
    study = optuna.load_study(study_name=summary["optuna"]["study_name"], storage=sweep["optuna"])
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * N_TRIALS


@pytest.mark.ray
def test_asha_stops_trials_by_its_rule(sweep: dict) -> None:
    import numpy as np
    import pandas as pd

    out = sweep["out"]
    table = pd.read_csv(out / "tune_results.csv")
    assert sweep["summary"]["n_stopped_early"] == int((table["epochs"] < EPOCHS).sum())
    # ASHA (rf 2, grace 1, one trial at a time): a trial stops after epoch 1 iff it is below the median of the
    # earlier trials' epoch-1 val rsum, and runs all epochs otherwise. (Whether any trial falls below depends on
    # the tiny models' chance-level scores, so the rule is checked both ways rather than a count of stops.)
    # Only trials of the first Tune session are checked against earlier trials: `Tuner.restore` does not bring
    # back ASHA's rung records (measured: after the resume the rung starts empty, so the next trial runs on).
    first_epoch = [pd.read_csv(Path(p) / "progress.csv")["val_rsum"].iloc[0] for p in table["path"]]
    first_session = [i for i, p in enumerate(table["path"]) if sweep["before"].get(Path(p).name, 0) > 0]
    assert first_session[:2] == [0, 1]
    for i in first_session[1:]:
        cutoff = np.nanpercentile(first_epoch[:i], 50)
        assert (table.loc[i, "epochs"] < EPOCHS) == (first_epoch[i] < cutoff), (i, first_epoch, cutoff)


@pytest.mark.ray
def test_mlflow_child_runs_and_champion(sweep: dict) -> None:
    import mlflow
    from mlflow import MlflowClient

    from cman.models.cman import CMAN

    summary, uri = sweep["summary"], sweep["uri"]
    client = MlflowClient(uri)
    state = summary["mlflow"]
    runs = client.search_runs([state["experiment_id"]], f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")
    assert len(runs) == N_TRIALS
    for run in runs:
        assert {"rank", "alpha", "margin", "lr", "model.fusion.layers"} <= set(run.data.params)
        assert run.data.params["model.fusion.layers"] in ("1", "2")
        assert run.data.params["training.epochs"] == str(EPOCHS)  # the trial's whole resolved config
        logged = yaml.safe_load(
            Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id, artifact_path="config.yaml", tracking_uri=uri
                )
            ).read_text()
        )
        assert logged["model"]["fusion"]["layers"] == int(run.data.params["model.fusion.layers"])
        assert logged["peft"]["rank"] == int(run.data.params["rank"])
        assert re.fullmatch(r"trial_\d{2} rank=\d+ lr=\d\.\de-\d\d", run.info.run_name), run.info.run_name
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_rsum")]
        assert 1 <= len(steps) <= EPOCHS and len(set(steps)) == len(steps)
        assert not any(">" in key or "@" in key for key in run.data.metrics)
    parent = client.get_run(state["parent_run_id"])
    assert parent.data.metrics["n_trials"] == N_TRIALS
    artifacts = {a.path for a in client.list_artifacts(state["parent_run_id"])}
    assert {"tune_results.csv", "val_rsum_curves.png", "eval_test.json"} <= artifacts

    champion = client.get_model_version_by_alias("cman", "champion")
    assert champion.tags["cman.dataset"] == "demo/train"  # dataset.json's generator: cman.data.demo
    assert champion.tags["cman.eval_split"] == "test" and len(champion.tags["cman.dataset_digest"]) == 16
    best_run = client.get_run(champion.run_id)
    assert best_run.inputs.dataset_inputs[0].dataset.digest == champion.tags["cman.dataset_digest"]
    assert best_run.data.tags["mlflow.source.git.commit"]
    assert best_run.data.tags["trial_id"] == summary["best_trial_id"]
    assert float(champion.tags["test_rsum"]) == pytest.approx(summary["test"]["rsum"], abs=1e-4)
    mlflow.set_tracking_uri(uri)
    model = CMAN.from_pretrained(mlflow.artifacts.download_artifacts("models:/cman@champion"))
    assert model.config.peft.rank == summary["best_params"]["rank"]
    assert model.config.model.fusion.layers == summary["best_params"]["model.fusion.layers"]


def test_champion_moves_only_for_a_better_model_of_the_same_data(tmp_path: Path) -> None:
    """Registry rule on a real sqlite store: a better test rsum on the same data takes @champion, a worse one is only
    registered; a model of other data goes to a name of its own, and neither dataset's champion displaces the other."""
    import mlflow
    from mlflow import MlflowClient

    from jobs import tracking
    from jobs.tracking.lineage import DATASET_TAG, DIGEST_TAG, SPLIT_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "registry-test", tmp_path / "artifacts")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.yaml").write_text("model: {}\n")
    demo = {DATASET_TAG: "demo/train", DIGEST_TAG: "aaaa", SPLIT_TAG: "test"}
    digits = {DATASET_TAG: "digits/train", DIGEST_TAG: "bbbb", SPLIT_TAG: "test"}

    def register(score: float, lineage: dict, name: str | None = None) -> dict:
        run_id = client.create_run(experiment).info.run_id
        tracking.log_checkpoint(client, run_id, checkpoint)
        return tracking.register_best(client, run_id, {"test_rsum": score, "val_rsum": score}, lineage, name)

    outcomes = [register(score, demo) for score in (10.0, 5.0, 20.0)]
    assert [o["promoted"] for o in outcomes] == [True, False, True]
    assert {o["name"] for o in outcomes} == {"cman"}
    assert client.get_model_version_by_alias("cman", "champion").version == outcomes[2]["version"]
    assert outcomes[1]["champion_version"] == outcomes[0]["version"]

    # a sweep on other data, with a far higher (incomparable) rsum: its own champion, cman's stays
    other = register(500.0, digits)
    assert other["name"] == "cman-digits" and other["promoted"]
    assert client.get_model_version_by_alias("cman", "champion").version == outcomes[2]["version"]
    assert register(400.0, digits)["promoted"] is False  # compared with digits' champion only
    assert register(30.0, demo)["promoted"] and register(30.0, demo)["name"] == "cman"
    assert client.get_model_version_by_alias("cman-digits", "champion").version == other["version"]
    # a name given in the config: other data is registered beside its champion, never displaces it
    forced = register(900.0, digits, name="cman")
    assert forced["name"] == "cman" and not forced["promoted"]
    champion = client.get_model_version_by_alias("cman", "champion")
    assert champion.tags[DATASET_TAG] == "demo/train" and float(champion.tags["test_rsum"]) == 30.0


def test_bad_search_space_is_one_error_before_any_trial(tune_root: Path, tmp_path: Path) -> None:
    from tuning.sweep import run_sweep

    with pytest.raises(ConfigError, match=r"tune\.space\.learning_rate"):
        tiny_config(tune_root, SIZES, **{"tune.space.learning_rate": [1e-3, 1e-5]})
    with pytest.raises(ConfigError, match=r"tune\.space\.rank"):
        tiny_config(tune_root, SIZES, **{"tune.space.rank": []})
    # a space whose corner makes an invalid trial config (loss.margin <= 2) fails before Ray or MLflow start
    config = tiny_config(tune_root, SIZES, **{"tune.space.margin": [0.1, 5.0]})
    with pytest.raises(ConfigError, match=r"tune\.space\.margin: 5\.0"):
        run_sweep(config, tmp_path / "never")
    assert not (tmp_path / "never").exists()

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cman.cli",
            "tune",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--set",
            "tune.space.rank=[]",
            "--output_dir",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tune.space.rank" in lines[0], proc.stderr
    assert not (tmp_path / "cli").exists()


def test_a_trial_bigger_than_the_local_ray_is_one_error(tune_root: Path) -> None:
    """`cman tune --config demo` (2 CPUs per trial) on a 1-CPU machine: a clear error, not a sweep waiting forever."""
    from tuning.sweep import check_trial_fits

    config = tiny_config(tune_root, SIZES, **{"tune.cpus_per_trial": 2, "tune.gpus_per_trial": 1})
    with pytest.raises(ConfigError, match=r"tune\.cpus_per_trial: 2 but this Ray has 1 in all.*cpus_per_trial=1"):
        check_trial_fits(config, {"CPU": 1.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match=r"tune\.gpus_per_trial: 1 but this Ray has 0 in all"):
        check_trial_fits(config, {"CPU": 2.0})
    check_trial_fits(config, {"CPU": 2.0, "GPU": 1.0})  # fits exactly


def test_concurrent_trials_that_cannot_all_fit_are_run_fewer_at_a_time(tune_root: Path, caplog) -> None:
    """`cman tune --config demo --max-concurrent 2` on 2 CPUs (2 CPUs a trial) used to wait forever: both drivers
    took their share and neither trial's workers found the rest. Now one runs at a time, with a warning."""
    from tuning.sweep import fit_concurrency

    config = tiny_config(tune_root, SIZES, **{"tune.cpus_per_trial": 2, "tune.max_concurrent": 2})
    with caplog.at_level("WARNING"):
        assert fit_concurrency(config, {"CPU": 2.0}).tune.max_concurrent == 1
    assert "do not fit this Ray's 2 CPUs at once" in caplog.text
    assert fit_concurrency(config, {"CPU": 4.0}).tune.max_concurrent == 2
    gpu = tiny_config(
        tune_root, SIZES, **{"tune.cpus_per_trial": 1, "tune.gpus_per_trial": 1, "tune.max_concurrent": 4}
    )
    assert fit_concurrency(gpu, {"CPU": 8.0, "GPU": 2.0}).tune.max_concurrent == 2


def test_any_config_key_can_be_swept_and_is_checked_before_ray(tune_root: Path) -> None:
    """`tune.space.<dotted key>: {choice|uniform|loguniform|int: ...}` beside (or instead of) the named four."""
    import pandas as pd

    from tuning.report import param_columns, param_importance
    from tuning.space import baseline_point, param_space, trial_config, trial_params

    config = tiny_config(
        tune_root,
        SIZES,
        **{
            "tune.space.model.fusion.layers": {"int": [1, 3]},
            "tune.space.training.weight_decay": {"uniform": [0.0, 0.1]},
            "tune.space.loss.mode": {"choice": ["hardest"]},
            "tune.space.rank": None,  # a named dimension left out
        },
    )
    space = param_space(config)
    assert set(space) == {"alpha_ratio", "margin", "lr", "model.fusion.layers", "training.weight_decay", "loss.mode"}
    assert space["loss.mode"].categories == ["hardest", config.loss.mode]  # the baseline's value joins the choices
    assert (space["model.fusion.layers"].lower, space["model.fusion.layers"].upper) == (1, 4)  # 3 included
    base = baseline_point(config)
    assert base["model.fusion.layers"] == config.model.fusion.layers and "rank" not in base
    trial = {**base, "model.fusion.layers": 3, "loss.mode": "hardest", "alpha_ratio": 1.0}
    resolved = trial_config(config, trial)
    assert resolved.model.fusion.layers == 3 and resolved.loss.mode == "hardest"
    assert resolved.peft.alpha == config.peft.rank  # alpha_ratio times the config's own rank
    assert trial_params(trial)["model.fusion.layers"] == 3 and "rank" not in trial_params(trial)

    bad = {
        "tune.space.model.fusion.layerz": {"choice": [1, 2]},  # no such key
        "tune.space.model.fusion.layers": {"int": [0, 2]},  # a corner the config rejects (layers >= 1)
    }
    for key, dist in bad.items():
        with pytest.raises(ConfigError, match=re.escape(key)):
            param_space(tiny_config(tune_root, SIZES, **{key: dist}))
    with pytest.raises(ConfigError, match=r"give a distribution"):
        tiny_config(tune_root, SIZES, **{"tune.space.model.fusion.layers": [1, 2]})
    with pytest.raises(ConfigError, match=r"is swept by tune\.space\.learning_rate"):
        tiny_config(tune_root, SIZES, **{"tune.space.training.learning_rate": {"uniform": [0.1, 0.2]}})

    table = pd.DataFrame(
        {
            "trial": range(4),
            "status": ["TERMINATED"] * 4,
            "lr": [1e-4, 3e-4, 1e-3, 2e-3],
            "model.fusion.layers": [1, 2, 1, 2],
            "epochs": [2] * 4,
            "best_val_rsum": [100.0, 300.0, 120.0, 310.0],
        }
    )
    assert param_columns(table) == ["lr", "model.fusion.layers"]
    importance = param_importance(table)
    assert set(importance) == {"lr", "model.fusion.layers"}
    assert importance["model.fusion.layers"] > importance["lr"]  # the layer count is what moved the score
