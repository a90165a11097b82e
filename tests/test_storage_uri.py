"""`--output-dir` as a storage URI (jobs/storage.py): Ray's results and checkpoints in the store, local files beside.

The sweep to a `file://` URI (interrupted, resumed, Optuna RDB storage) is the module sweep of tests/test_tune.py;
here: the flag's errors, the local-dir rule, and Optuna's resume without a second baseline.
"""

from __future__ import annotations

from pathlib import Path

import pytest


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
