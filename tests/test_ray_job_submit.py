"""`ray job submit ... -- python -m jobs.train` against a real `ray start --head` cluster started (and stopped, by its
own process ids only) by this test; the job leaves checkpoints, the test report and an MLflow run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny import REPO

VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 420
UPLOAD_EXCLUDES = [".venv", ".git", "outputs", "data", "runs", "ray_results", "tests/artifacts", "bench/results"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _descendants(root: int) -> set[int]:
    """Every live process whose parent chain leads to `root` (the `ray start --block` we launched)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture()
def head_node() -> Iterator[dict]:
    """`ray start --head --block` from this venv (so the job's `python` is the venv's), on free ports."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # unix socket paths must stay short
    gcs, dashboard, *others = _free_ports(9)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once on SIGTERM (no 30 s drain)
    }
    env.pop("RAY_ADDRESS", None)
    flags = [
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    ]
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--include-dashboard",
        "true",
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    ]
    for flag, port in zip(flags, others, strict=True):
        cmd += [flag, str(port)]
    log = open(f"{temp_dir}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not come up: {Path(temp_dir + '.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield {"url": url, "env": env}
    finally:
        started = _descendants(proc.pid) | {proc.pid}
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        time.sleep(2)
        for pid in sorted(started):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        Path(f"{temp_dir}.log").unlink(missing_ok=True)
        assert not [pid for pid in started if _alive(pid)], "processes of our head node survived"


@pytest.mark.ray
def test_ray_job_submit_trains_and_tracks(head_node: dict, demo_root: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "job_run"
    # as in the README; HF_HUB_OFFLINE here also checks that run_training does not set it again (a conflict)
    runtime_env = {"excludes": UPLOAD_EXCLUDES, "env_vars": {"HF_HUB_OFFLINE": "1"}}
    overrides = {
        "data.root": demo_root,
        "data.max_items": 24,
        "training.epochs": 2,
        "training.batch_size": 8,
        "ray.num_workers": 1,
        "model.fusion.layers": 1,
        "model.text.init.num_hidden_layers": 1,
        "model.audio.init.num_hidden_layers": 1,
        "model.image.init.num_hidden_layers": 1,
    }
    entrypoint = ["python", "-m", "jobs.train", "--config", "configs/demo.yaml", "--output_dir", str(out)]
    for key, value in overrides.items():
        entrypoint += ["--set", f"{key}={value}"]
    submit = subprocess.run(
        [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            head_node["url"],
            "--no-wait",
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *entrypoint,
        ],
        env=head_node["env"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = next(w.strip("'") for w in submit.stdout.split() if w.strip("'").startswith("raysubmit_"))

    client = JobSubmissionClient(head_node["url"])
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status} after {JOB_TIMEOUT_S}s"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "text->image" in logs and "rsum" in logs  # the printed test table

    assert (out / "checkpoints" / "best" / "metadata.json").is_file()
    assert json.loads((out / "checkpoints" / "last" / "metadata.json").read_text())["epoch"] == 2
    assert json.loads((out / "eval_test.json").read_text())["split"] == "test"
    mlflow_client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = mlflow_client.get_experiment_by_name("cman")
    (run,) = mlflow_client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "val_rsum")] == [1, 2]
    assert "test_rsum" in run.data.metrics

    # the same config trained in this process (no Ray; same seed, same thread count) has the same losses
    import torch

    from cman.config import load_config
    from cman.training import fit

    config = load_config(REPO / "configs" / "demo.yaml", {**overrides, "data.root": str(demo_root)})
    threads = torch.get_num_threads()
    try:
        local = fit(config, tmp_path / "in_process", resume=False, progress=False)
    finally:
        torch.set_num_threads(threads)
    for key in ("train_loss", "val_rsum"):
        logged = sorted(mlflow_client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.value for m in logged] == pytest.approx([h[key] for h in local["history"]], abs=1e-5), key
