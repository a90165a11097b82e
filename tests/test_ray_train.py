"""Ray Train path of `cman train` (jobs/train.py): same numbers as the in-process loop, DDP with gathered
validation, and re-running an interrupted run. Real Ray, real MLflow (sqlite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import tiny_config

SIZES = {"training.batch_size": 8, "data.max_items": 24}  # small batches on top of tiny_config's 1-layer models


def steps_logged(output_dir: Path, key: str) -> list[int]:
    """The epochs at which MLflow received `key`, in logging order (an epoch trained twice shows up twice)."""
    from jobs import tracking

    run = tracking.Tracking(**json.loads((output_dir / tracking.RUN_FILE).read_text()))
    return tracking.metric_steps(run, key)


@pytest.fixture(autouse=True)
def _default_mlflow_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sqlite store under the output dir


def test_in_process_ray_loop_matches_engine_fit(demo_root: Path, tmp_path: Path) -> None:
    """ScalingConfig(num_workers=0) runs train_loop_per_worker in this process: same history as cman.training.fit."""
    from cman.training import fit
    from jobs.train import run_training

    config = tiny_config(demo_root, SIZES, **{"training.epochs": 2, "ray.num_workers": 0})
    ray_report = run_training(config, tmp_path / "ray", track=False)
    fit_report = fit(config, tmp_path / "fit", resume=False, progress=False)

    assert [h["epoch"] for h in ray_report["history"]] == [1, 2]
    for ours, theirs in zip(ray_report["history"], fit_report["history"], strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
        assert ours["val_rsum"] == pytest.approx(theirs["val_rsum"], abs=1e-5)
    assert ray_report["test"]["rsum"] == pytest.approx(fit_report["test"]["rsum"], abs=1e-5)
    for name in ("best", "last"):
        assert (tmp_path / "ray" / "checkpoints" / name / "metadata.json").is_file()
    assert json.loads(Path(ray_report["eval_path"]).read_text())["split"] == "test"


@pytest.mark.ray
def test_interrupted_two_worker_run_continues_when_rerun(
    ray_session, demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 DDP workers; rank 0 dies at the start of epoch 2 with no retries left, so the run fails. The same call with
    the same output dir continues it from the epoch-1 checkpoint (epoch 1 is not trained or logged again) and the
    gathered val metrics equal a single-process evaluation of the checkpoint; re-running the finished run trains
    nothing more; resume=False starts over. (Restarts within a run, `ray.max_failures`, are tested with a real worker
    SIGKILL in test_faults_train_tune.py; one test here keeps the suite to three Train runs instead of five.)"""
    from mlflow.tracking import MlflowClient
    from ray.train import TrainingFailedError

    import jobs.train
    from cman.training import evaluate_checkpoint
    from jobs.train import FAIL_ONCE_ENV, run_training

    out = tmp_path / "run"
    config = tiny_config(
        demo_root,
        SIZES,
        **{"training.epochs": 2, "ray.num_workers": 2, "ray.max_failures": 0, "training.num_threads": 1},
    )
    monkeypatch.setenv(FAIL_ONCE_ENV, "2")
    with pytest.raises(TrainingFailedError):
        run_training(config, out)
    assert (out / ".injected_failure_epoch_2").exists(), "the injected failure did not happen"
    assert not (out / "checkpoints").exists()
    assert steps_logged(out, "val_rsum") == [1]

    monkeypatch.delenv(FAIL_ONCE_ENV)
    report = run_training(config, out)
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    # epoch 1 was trained (and logged) once: the re-run resumed from its checkpoint instead of from scratch
    assert steps_logged(out, "val_rsum") == [1, 2]
    assert steps_logged(out, "train_loss") == [1, 2]

    last = out / "checkpoints" / "last"
    meta = json.loads((last / "metadata.json").read_text())
    assert meta["epoch"] == 2
    single = evaluate_checkpoint(last, "val")
    # The sharded, gathered embeddings and the single-process ones differ by float rounding (~1e-7: other batch
    # sizes); among 24 near-random items that can swap two near-tied neighbours, moving a query by one rank. A
    # gather in the wrong order would move every metric by far more.
    two_queries = 2 * 100.0 / next(iter(single["directions"].values()))["n_queries"]
    assert meta["metrics"]["rsum"] == pytest.approx(single["rsum"], abs=two_queries)
    for direction, values in single["directions"].items():
        one_query = 100.0 / values["n_queries"]
        for name, value in values.items():
            slack = {"medR": 1.0, "n_queries": 0.0, "n_skipped": 0.0}.get(name, one_query)
            gathered = meta["metrics"]["directions"][direction][name]
            assert gathered == pytest.approx(value, abs=slack + 1e-6), (direction, name, gathered, value)
    best_meta = json.loads((out / "checkpoints" / "best" / "metadata.json").read_text())
    assert best_meta["metrics"]["rsum"] == max(h["val_rsum"] for h in report["history"])
    assert json.loads(Path(report["eval_path"]).read_text())["rsum"] == pytest.approx(report["test"]["rsum"])

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished run started Ray Train again")

    with monkeypatch.context() as m:
        m.setattr(jobs.train, "build_trainer", no_fit)
        again = run_training(config, out)  # finished: exported and evaluated again without a Train run
    assert again["history"] == report["history"]
    assert steps_logged(out, "val_rsum") == [1, 2]

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.epochs"] == "2"
    assert 0 <= run.data.metrics["val_text_to_image_R_at_1"] <= 100
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint_best", "eval_test.json", "plots"}

    # resume=False starts over. One epoch: resumed instead, the finished 2-epoch run would be exported again with its
    # history [1, 2] and no training, so [1] shows a new run that trained (and a second MLflow run)
    fresh = run_training(config.with_overrides({"training.epochs": 1}), out, resume=False)
    assert [h["epoch"] for h in fresh["history"]] == [1]
    assert len(client.search_runs([experiment.experiment_id])) == 2
