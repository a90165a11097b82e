"""Real process kills (SIGKILL from outside) during `cman train` and `cman tune`, both run as CLI subprocesses.

- Train: a Ray Train worker process of a running `cman train` is SIGKILLed mid-epoch; `ray.max_failures` restarts
  the worker group from the latest checkpoint and the run finishes with the configured epoch count.
- Tune: the `cman tune` driver process is SIGKILLed mid-sweep; `cman tune --resume` finishes the sweep without
  training a finished trial again, and no MLflow run of the killed attempt stays RUNNING.

Each subprocess starts its own local Ray in a private RAY_TMPDIR (so it never joins another cluster on the machine);
its processes are found in the subprocess's own process tree and every one of them is killed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from tiny import ONE_LAYER, REPO

TINY = {
    **ONE_LAYER,
    "training.batch_size": 8,
    "training.eval_batch_size": 32,
    "data.max_items": 24,
}
TRAIN_EPOCHS = 4
# Ray Train's controller collects a worker's reports when it polls the workers (every 2 s by default): a checkpoint
# reported less than one poll before the worker dies is on disk but not yet Ray's latest. The Train test polls faster
# and kills the worker only after REGISTERED_AFTER_S.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
REGISTERED_AFTER_S = 2.0
TUNE_EPOCHS = 1
TUNE_TRIALS = 2
KILL_AFTER_S = 3.0

pytestmark = pytest.mark.ray


# ---- subprocesses and their process trees ------------------------------------------------------------------------
class CmanProcess:
    """`python -m cman.cli ARGS` in its own process group, with its own Ray temp dir; remembers every descendant."""

    def __init__(self, args: list[str], log: Path, ray_tmp: Path, env: dict[str, str] | None = None):
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")} | (env or {})
        env.update(
            RAY_TMPDIR=str(ray_tmp),
            RAY_AUTH_MODE="disabled",
            HF_HUB_OFFLINE="1",
            PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        )
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "cman.cli", *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.root = psutil.Process(self.popen.pid)
        self.seen: dict[int, psutil.Process] = {}
        self.cmdlines: dict[int, str] = {}  # latest command line seen per pid (Ray retitles its workers)

    def descendants(self) -> list[psutil.Process]:
        """Live descendants now (Ray's GCS, raylet, workers...); all of them are remembered for `kill_all`."""
        try:
            children = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for child in children:
            self.seen.setdefault(child.pid, child)
            try:
                self.cmdlines[child.pid] = " ".join(child.cmdline())
            except psutil.Error:
                pass
        return children

    def find(self, marker: str) -> list[psutil.Process]:
        """Live descendants whose command line (Ray sets it to `ray::<Actor>...`) contains `marker`."""
        return [p for p in self.descendants() if marker in self.cmdlines.get(p.pid, "")]

    def ever(self, marker: str) -> set[int]:
        """Pids of every descendant seen so far whose command line contained `marker`."""
        self.descendants()
        return {pid for pid, cmdline in self.cmdlines.items() if marker in cmdline}

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"{self.popen.args[3:5]} did not finish within {timeout:.0f} s; log:\n{self.tail()}")

    def kill_all(self) -> None:
        """SIGKILL the subprocess and every process it started (psutil checks that a pid was not reused)."""
        self.descendants()
        for proc in [self.root, *self.seen.values()]:
            try:
                proc.kill()
            except psutil.Error:
                pass
        self.popen.wait(timeout=10)  # reaped by Popen (not psutil), so popen.returncode stays the real status
        psutil.wait_procs(list(self.seen.values()), timeout=10)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture
def cman_process(tmp_path: Path) -> Iterator[Callable[..., CmanProcess]]:
    ray_tmp = Path(tempfile.mkdtemp(prefix="cmanray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    started: list[CmanProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CmanProcess:
        proc = CmanProcess(list(args), tmp_path / f"cman_{len(started)}.log", ray_tmp, env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill_all()
    subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def poll(condition: Callable[[], object], proc: CmanProcess, timeout: float, what: str) -> object:
    """Poll `condition` every 0.2 s until it is truthy; fail if `proc` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.popen.poll() is not None:
            pytest.fail(f"cman exited ({proc.popen.returncode}) while waiting for {what}; log:\n{proc.tail()}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout:.0f} s; log:\n{proc.tail()}")


def checkpoint_epochs(directory: Path) -> list[int]:
    """Epochs of the checkpoints written so far under `directory` (each has a metadata.json with its epoch)."""
    epochs = []
    for meta in directory.rglob("metadata.json"):
        try:
            epochs.append(int(json.loads(meta.read_text())["epoch"]))
        except (OSError, ValueError, KeyError):  # being written right now
            continue
    return sorted(epochs)


def set_args(overrides: dict[str, object]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def metric_steps(client, run_id: str, key: str = "val_rsum") -> list[int]:
    """Steps at which `key` was logged to `run_id`, in logging order (an epoch trained twice shows up twice)."""
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


# ---- Train: a worker dies --------------------------------------------------------------------------------------------
def test_train_worker_sigkill_restarts_from_checkpoint(cman_process, demo_root: Path, tmp_path: Path) -> None:
    """SIGKILL the Ray Train worker process while it trains an epoch after the first checkpoint; the run restarts
    the worker group from a checkpoint of epoch >= 1 and finishes all epochs (no epoch before it trained twice)."""
    from mlflow import MlflowClient

    from cman.config import load_config

    out = tmp_path / "train"
    overrides = {
        **TINY,
        "data.root": demo_root,
        "training.epochs": TRAIN_EPOCHS,
        "ray.num_workers": 1,
        "ray.max_failures": 1,
        "data.max_items": 96,  # 12 steps an epoch: the kill lands inside an epoch more often than between two
    }
    config_path = REPO / "configs" / "demo.yaml"
    args = ["train", "--config", str(config_path), "--output-dir", str(out), *set_args(overrides)]
    proc = cman_process(*args, env=TRAIN_ENV)

    # wait for the first checkpoint (epoch >= 1) and for Ray to register it; the worker is then in a later epoch
    poll(lambda: checkpoint_epochs(out), proc, 120, "first checkpoint")
    (worker,) = poll(lambda: proc.find("RayTrainWorker"), proc, 30, "Ray Train worker process")
    time.sleep(REGISTERED_AFTER_S)
    done_before_kill = max(checkpoint_epochs(out))
    assert done_before_kill < TRAIN_EPOCHS, "the run finished before the kill: make epochs longer"
    killed_at_ms = time.time() * 1000
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)

    poll(lambda: proc.ever("RayTrainWorker") - {worker.pid}, proc, 60, "a new Ray Train worker after the kill")
    rc = proc.wait(timeout=180)
    assert rc == 0, proc.tail()

    last = json.loads((out / "checkpoints" / "last" / "metadata.json").read_text())
    assert last["epoch"] == TRAIN_EPOCHS
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(load_config(config_path).mlflow.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    # Rank 0 logs each epoch to MLflow after reporting it. Resumed from a checkpoint of epoch r >= 1, the restarted
    # worker logs epochs r+1..E; from scratch it would log 1..E again. (The killed worker may not have logged its
    # last reported epoch yet, so epochs before the kill are not checked.)
    history = client.get_metric_history(run.info.run_id, "val_rsum")
    after_kill = [m.step for m in sorted(history, key=lambda m: m.timestamp) if m.timestamp > killed_at_ms]
    assert after_kill, "no epoch was logged after the kill"
    resumed_from = after_kill[0] - 1
    assert 1 <= resumed_from <= done_before_kill, f"restart trained epochs {after_kill} (kill after {done_before_kill})"
    assert after_kill == list(range(resumed_from + 1, TRAIN_EPOCHS + 1)), after_kill


# ---- Tune: the driver dies -------------------------------------------------------------------------------------------
def sweep_runs(uri: str) -> dict[str, object]:
    """`{run_id: Run}` of every run in every experiment of the sweep's MLflow store ({} while it is being created)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        return {r.info.run_id: r for r in client.search_runs(experiments, max_results=1000)} if experiments else {}
    except Exception:  # noqa: BLE001 - the store is being created or written by the sweep right now
        return {}


def second_trial_training(uri: str) -> tuple[list[object], list[object]] | None:
    """(finished trial runs, running trial runs) once there is one of each, else None."""
    trials = [r for r in sweep_runs(uri).values() if "trial_id" in r.data.tags]
    finished = [r for r in trials if r.info.status == "FINISHED"]
    running = [r for r in trials if r.info.status == "RUNNING"]
    return (finished, running) if finished and running else None


def test_tune_driver_sigkill_then_resume(cman_process, demo_root: Path, tmp_path: Path) -> None:
    """SIGKILL `cman tune` while its second trial trains; `cman tune --resume` trains that trial to the end without
    training the first one again, and no MLflow run is left RUNNING."""
    import pandas as pd
    from mlflow import MlflowClient

    out = tmp_path / "sweep"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {
        **TINY,
        "data.root": demo_root,
        "training.epochs": TUNE_EPOCHS,
        "tune.num_samples": TUNE_TRIALS,
        "tune.max_concurrent": 1,
        "tune.cpus_per_trial": 1,
        "tune.grace_period": TUNE_EPOCHS,  # ASHA stops nothing: every trial runs all epochs
        "mlflow.tracking_uri": uri,
    }
    args = ["tune", "--config", str(REPO / "configs" / "demo.yaml"), "--output-dir", str(out), *set_args(overrides)]
    driver = cman_process(*args)
    finished, running = poll(lambda: second_trial_training(uri), driver, 240, "a second trial")
    time.sleep(KILL_AFTER_S)  # into the second trial's training
    driver.popen.send_signal(signal.SIGKILL)  # the `cman tune` process itself: Tune's driver
    assert driver.popen.wait(timeout=30) == -signal.SIGKILL
    driver.kill_all()  # and what it left behind (Ray's processes share its fate; anything else is killed here)

    killed = sweep_runs(uri)
    left_running = {rid for rid, r in killed.items() if r.info.status == "RUNNING"}
    assert {r.info.run_id for r in running} <= left_running  # what the kill leaves: runs that say RUNNING
    done_trial = finished[0].data.tags["trial_id"]
    done_steps = metric_steps(MlflowClient(uri), finished[0].info.run_id)
    assert done_steps == list(range(1, TUNE_EPOCHS + 1))

    resumed = cman_process(*args, "--resume")
    assert resumed.wait(timeout=240) == 0, resumed.tail()

    client = MlflowClient(uri)
    after = sweep_runs(uri)
    statuses = {rid: r.info.status for rid, r in after.items()}
    assert "RUNNING" not in statuses.values(), statuses
    for rid in left_running:  # each run of the killed attempt was resumed (and finished) or marked as failed
        assert statuses[rid] in ("FINISHED", "FAILED", "KILLED"), (rid, statuses[rid])
    trials = [r for r in after.values() if "trial_id" in r.data.tags and r.info.status == "FINISHED"]
    assert len(trials) == TUNE_TRIALS, statuses
    # the finished trial was not trained again: its run still holds each epoch once
    assert metric_steps(client, finished[0].info.run_id) == done_steps
    for run in trials:
        assert sorted(set(metric_steps(client, run.info.run_id))) == list(range(1, TUNE_EPOCHS + 1))

    table = pd.read_csv(out / "tune_results.csv")
    assert len(table) == TUNE_TRIALS and (table["status"] == "TERMINATED").all()
    assert done_trial in set(table["trial_id"])
    # the killed trial's run: continued by the resumed sweep (tag cman.resumed) or, if Tune's saved state did not know
    # the trial yet, closed as FAILED (tag cman.interrupted) while Tune ran a new trial in its place
    killed_run = after[running[0].info.run_id]
    if running[0].data.tags["trial_id"] in set(table["trial_id"]):
        assert killed_run.info.status == "FINISHED" and killed_run.data.tags.get("cman.resumed") == "true"
    else:
        assert killed_run.info.status == "FAILED" and "cman.interrupted" in killed_run.data.tags
    assert (out / "best" / "metadata.json").is_file()
