"""`--output-dir` as a storage URI (jobs/storage.py): Ray's results and checkpoints in the store, local files beside.

The sweep runs with `file:///<tmp>/store/sweep` (the same code path as s3:// or gs://: a pyarrow filesystem + path
handed to Ray) and an Optuna RDB storage; it is interrupted when its second trial starts and resumed through the CLI.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from tiny import REPO

N_TRIALS = 2
TINY = {
    "model.text.init.num_hidden_layers": 1,
    "model.audio.init.num_hidden_layers": 1,
    "model.image.init.num_hidden_layers": 1,
    "model.fusion.layers": 1,
    "training.batch_size": 16,
    "training.eval_batch_size": 32,
    "training.epochs": 1,
    "tune.num_samples": N_TRIALS,
    "tune.max_concurrent": 1,
    "tune.cpus_per_trial": 1,
    "tune.grace_period": 1,
}


def test_bad_storage_uri_names_the_flag(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from cman.cli import main
    from jobs.storage import default_local_dir, locate

    with pytest.raises(ValueError, match=r"--output-dir foo://x: not a storage pyarrow can open"):
        locate("foo://x")
    assert main(["train", "--config", "demo", "--output-dir", "foo://x/run"]) == 1
    assert "--output-dir foo://x/run: not a storage pyarrow can open" in capsys.readouterr().err
    assert main(["train", "--config", "demo", "--output-dir", str(tmp_path), "--local-dir", "x"]) == 1
    assert "--local-dir is only used with a storage URI --output-dir" in capsys.readouterr().err
    assert default_local_dir("s3://bucket/sweeps/s1?region=eu-west-1") == Path("cman-runs/bucket/sweeps/s1")
    plain = locate(tmp_path / "run")  # a plain path: one folder, as before
    assert (plain.local_dir, plain.remote, plain.ray_storage()) == (
        tmp_path / "run",
        False,
        {"storage_path": str(tmp_path / "run")},
    )


def test_resumed_optuna_search_does_not_queue_the_baseline_again(tmp_path: Path) -> None:
    """Tune calls `set_search_properties` (which enqueues `points_to_evaluate`) before it loads a resumed searcher:
    in an RDB storage that extra copy of the baseline must not stay queued (plain `OptunaSearch` would run it again)."""
    import optuna
    from ray import tune

    from tuning.search import ResumableOptunaSearch

    url, space = f"sqlite:///{tmp_path / 'optuna.db'}", {"x": tune.uniform(0, 1)}

    def searcher() -> ResumableOptunaSearch:
        storage = optuna.storages.RDBStorage(url)
        s = ResumableOptunaSearch(points_to_evaluate=[{"x": 0.5}], seed=0, storage=storage, study_name="s")
        s.set_search_properties("m", "max", space)
        return s

    first = searcher()
    assert first.suggest("t1") == {"x": 0.5}
    first.on_trial_complete("t1", {"m": 1.0})
    first.save(str(tmp_path / "state.pkl"))
    resumed = searcher()
    resumed.restore(str(tmp_path / "state.pkl"))
    assert resumed.suggest("t2") != {"x": 0.5}
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 2


def _interrupt_when_trial_starts(trials: Path, n: int, stop: threading.Event) -> None:
    """SIGUSR1 (what Tune treats like Ctrl-C) once trial number `n` has its local folder."""
    while not stop.is_set():
        if trials.is_dir() and len([p for p in trials.iterdir() if p.is_dir()]) >= n:
            signal.raise_signal(signal.SIGUSR1)
            return
        time.sleep(0.2)


@pytest.mark.ray
def test_sweep_to_storage_uri_resumes_and_keeps_local_files_apart(
    ray_session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna
    import pandas as pd

    from cman.cli import main
    from cman.config import load_config
    from cman.data.demo import generate_demo_dataset
    from tuning.sweep import run_sweep

    monkeypatch.chdir(tmp_path)  # a path mistaken for a folder (`file:`) would appear here
    root, store, local = tmp_path / "data", tmp_path / "store" / "sweep", tmp_path / "local"
    generate_demo_dataset(root, seed=0, counts={"train": 48, "val": 24, "test": 24})
    optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    sets = {**TINY, "data.root": str(root), "tune.optuna_storage": optuna_url}
    uri = store.as_uri()
    start = time.perf_counter()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # a late signal must not kill the test process
    stop = threading.Event()
    watcher = threading.Thread(target=_interrupt_when_trial_starts, args=(local / "trials", N_TRIALS, stop))
    watcher.start()
    try:
        with pytest.raises(RuntimeError, match=f"interrupted after 1/{N_TRIALS} trials"):
            run_sweep(load_config(REPO / "configs" / "demo.yaml", sets), uri, local_dir=local)
        interrupted = time.perf_counter() - start
        args = ["tune", "--config", str(REPO / "configs" / "demo.yaml"), "--output-dir", uri, "--local-dir", "local"]
        assert main([*args, *[f"--set={k}={v}" for k, v in sets.items()], "--resume"]) == 0
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)
    print(f"\nsweep to {uri}: interrupted after {interrupted:.0f} s, done after {time.perf_counter() - start:.0f} s")

    # Ray's experiment and every trial's Train checkpoints are in the store ...
    assert (store / "tune").is_dir()
    table = pd.read_csv(local / "tune_results.csv")
    assert len(table) == N_TRIALS and (table["status"] == "TERMINATED").all()
    for trial_id in table["trial_id"]:
        assert list((store / "trials" / trial_id / "ray_results").glob("*/checkpoint_*/metadata.json")), trial_id
    # ... the local artefacts beside it, and no checkpoint, Ray experiment or `file:` folder locally
    for name in ("mlflow.db", "sweep.json", "sweep_summary.json", "best/eval_test.json", "best/config.yaml"):
        assert (local / name).is_file(), name
    assert not list(local.rglob("checkpoint_*")) and not (local / "tune").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(":")]
    assert load_config(local / "config.yaml").output_dir == uri

    # the Optuna study in the RDB storage holds exactly the sweep's trials (the baseline not queued again on resume)
    summary = pd.read_json(local / "sweep_summary.json", typ="series")
    assert summary["storage"] == uri and summary["n_trials"] == N_TRIALS
    study = optuna.load_study(study_name=summary["optuna"]["study_name"], storage=optuna_url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * N_TRIALS
