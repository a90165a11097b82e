"""Real process kills (SIGKILL from outside) during `cman train` and `cman tune`, both run as CLI subprocesses.

- Train: a Ray Train worker process of a running `cman train` is SIGKILLed while it waits at a pause point after
  checkpoint 1 (jobs.faults); `ray.max_failures` restarts the worker group from that checkpoint and the run finishes
  with the configured epoch count.
- Tune: the `cman tune` driver process, a driver of a `ray start --head` cluster, is SIGKILLed mid-sweep; `cman tune
  --resume` finishes the sweep without training a finished trial again, no MLflow run of the killed attempt stays
  RUNNING, and the cluster holds no placement group and no CPU after either.

`cman train` starts its own local Ray in a private RAY_TMPDIR (so it never joins another cluster on the machine); its
processes are found in the subprocess's own process tree and every one of them is killed at the end.
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
import ray_cluster
from tiny import ONE_LAYER, REPO

# CMAN_FAULT_TEST_ITEMS=8 cuts each run's work ~3x (24 items: 3 steps an epoch): how a box faster than this one
# looks to these tests. Where each kill lands is set by pause points (jobs.faults), never by how much work fits
# into a sleep.
ITEMS = int(os.environ.get("CMAN_FAULT_TEST_ITEMS", "24"))
TINY = {
    **ONE_LAYER,
    "training.batch_size": 8,
    "training.eval_batch_size": 32,
    "data.max_items": ITEMS,
}
TRAIN_EPOCHS = 3
PAUSE_BEFORE_EPOCH = 2  # the Train worker waits before epoch 2, i.e. after checkpoint 1, until the test kills it
# Ray Train's controller collects a worker's reports when it polls the workers (every 2 s by default, 0.5 s here):
# a checkpoint reported but not yet collected is on disk but not Ray's latest. The Train test waits until Ray has
# registered checkpoint 1 (its checkpoint manager's snapshot says so) before it kills the paused worker.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
TUNE_EPOCHS = 1
TUNE_TRIALS = 2

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


def pause_env(pause_dir: Path, pattern: str) -> dict[str, str]:
    """Environment that stops the run's Train workers at pause points matching `pattern` (jobs.faults)."""
    from jobs import faults

    return {faults.DIR_ENV: str(pause_dir), faults.AT_ENV: pattern}


def paused(pause_dir: Path) -> list[str]:
    """Pause points a process waits at now (or waited at: a released point keeps its .paused file)."""
    return sorted(p.name.removesuffix(".paused") for p in pause_dir.glob("*.paused"))


def registered_epoch(run_dir: Path) -> int:
    """Epoch of the checkpoint that Ray Train's controller registered as its latest (0 before any)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("epoch", 0))


def assert_cluster_free(head_node: dict, when: str) -> None:
    state = ray_cluster.cluster_is_free(head_node)
    assert state["held"] == {} and state["free"] == state["total"], (when, state)


def set_args(overrides: dict[str, object]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def metric_steps(client, run_id: str, key: str = "val_rsum") -> list[int]:
    """Steps at which `key` was logged to `run_id`, in logging order (an epoch trained twice shows up twice)."""
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


# ---- Train: a worker dies --------------------------------------------------------------------------------------------
def test_train_worker_sigkill_restarts_from_checkpoint(cman_process, demo_root: Path, tmp_path: Path) -> None:
    """SIGKILL the Ray Train worker process while it waits before epoch 2 (checkpoint 1 registered by Ray); the run
    restarts the worker group from checkpoint 1 and trains epochs 2.. to the end (epoch 1 is not trained twice)."""
    from mlflow import MlflowClient

    from cman.config import load_config

    out, pause = tmp_path / "train", tmp_path / "pause"
    overrides = {
        **TINY,
        "data.root": demo_root,
        "training.epochs": TRAIN_EPOCHS,
        "ray.num_workers": 1,
        "ray.max_failures": 1,
    }
    config_path = REPO / "configs" / "demo.yaml"
    args = ["train", "--config", str(config_path), "--output-dir", str(out), *set_args(overrides)]
    proc = cman_process(*args, env={**TRAIN_ENV, **pause_env(pause, f"train-*-epoch-{PAUSE_BEFORE_EPOCH}")})

    poll(lambda: paused(pause), proc, 240, f"the Train worker at its pause before epoch {PAUSE_BEFORE_EPOCH}")
    run_dir = out / "ray_results" / "cman_train"
    poll(lambda: registered_epoch(run_dir) == PAUSE_BEFORE_EPOCH - 1, proc, 60, "Ray registering checkpoint 1")
    (worker,) = poll(lambda: proc.find("RayTrainWorker"), proc, 30, "Ray Train worker process")
    killed_at_ms = time.time() * 1000
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    (pause / "go").touch()  # the restarted worker goes straight on

    poll(lambda: proc.ever("RayTrainWorker") - {worker.pid}, proc, 60, "a new Ray Train worker after the kill")
    rc = proc.wait(timeout=240)
    assert rc == 0, proc.tail()

    last = json.loads((out / "checkpoints" / "last" / "metadata.json").read_text())
    assert last["epoch"] == TRAIN_EPOCHS
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(load_config(config_path).mlflow.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    # Rank 0 logs each epoch to MLflow after reporting it, before the pause. Resumed from checkpoint 1, the restarted
    # worker logs epochs 2..E; from scratch it would log 1..E again.
    history = client.get_metric_history(run.info.run_id, "val_rsum")
    steps = [m.step for m in sorted(history, key=lambda m: m.timestamp)]
    after_kill = [m.step for m in sorted(history, key=lambda m: m.timestamp) if m.timestamp > killed_at_ms]
    assert after_kill == list(range(PAUSE_BEFORE_EPOCH, TRAIN_EPOCHS + 1)), (after_kill, steps)
    assert steps == list(range(1, TRAIN_EPOCHS + 1)), steps


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


@pytest.fixture()
def head_node() -> Iterator[dict]:
    yield from ray_cluster.head_node()


def test_tune_driver_sigkill_then_resume(cman_process, head_node: dict, demo_root: Path, tmp_path: Path) -> None:
    """`cman tune` as a driver of a `ray start --head` cluster (RAY_ADDRESS), SIGKILLed while its second trial runs
    (its worker held at a pause point); `cman tune --resume` trains that trial to the end without training the first
    one again, and no MLflow run is left RUNNING. After the kill and after the resumed sweep the cluster's
    placement-group table holds no group and every CPU is free."""
    import pandas as pd
    from mlflow import MlflowClient

    out, pause = tmp_path / "sweep", tmp_path / "pause"
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
    cluster = {"RAY_ADDRESS": head_node["address"]}
    driver = cman_process(*args, env=cluster | pause_env(pause, "train-*-epoch-1"))  # each trial's worker waits
    (first,) = poll(lambda: paused(pause), driver, 240, "the first trial's worker")
    (pause / f"{first}.go").touch()  # the first trial trains and finishes
    poll(lambda: len(paused(pause)) == 2, driver, 240, "the second trial's worker")
    finished, running = poll(lambda: second_trial_training(uri), driver, 60, "the first trial's run FINISHED")
    driver.popen.send_signal(signal.SIGKILL)  # the `cman tune` process itself: Tune's driver
    assert driver.popen.wait(timeout=30) == -signal.SIGKILL
    driver.kill_all()  # and anything it started itself
    assert_cluster_free(head_node, "after the driver was killed")

    killed = sweep_runs(uri)
    left_running = {rid for rid, r in killed.items() if r.info.status == "RUNNING"}
    assert {r.info.run_id for r in running} <= left_running  # what the kill leaves: runs that say RUNNING
    done_trial = finished[0].data.tags["trial_id"]
    done_steps = metric_steps(MlflowClient(uri), finished[0].info.run_id)
    assert done_steps == list(range(1, TUNE_EPOCHS + 1))

    resumed = cman_process(*args, "--resume", env=cluster)
    assert resumed.wait(timeout=240) == 0, resumed.tail()
    assert_cluster_free(head_node, "after the resumed sweep")

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
