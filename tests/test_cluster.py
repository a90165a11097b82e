"""Two Ray nodes across a real network (tools/cluster/up.sh: each node in its own network namespace, the worker with
its own view of the disk), Ray's results and checkpoints in an S3-compatible store: a sweep submitted with
`ray job submit` runs trials on both nodes, survives the loss of the worker node, and leaves nothing outside the
bucket and the driver's `--local-dir`. Needs root (namespaces, links, mounts), as CI has."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny import ONE_LAYER, REPO

CLUSTER = REPO / "tools" / "cluster"
TRIALS, EPOCHS = 2, 2  # one trial a node at once: the killed one restarts on the head
JOB_TIMEOUT_S = 900
UPLOAD_EXCLUDES = ["/.venv", "/.git", "/outputs", "/data", "/runs", "/tests/artifacts", "/bench/results"]

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="network namespaces need root and ip"),
]


def _sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _env_file(state: Path) -> dict[str, str]:
    """The variables tools/cluster/up.sh wrote to STATE/cluster.env (`export A=x B=y` lines)."""
    found = {}
    for line in (state / "cluster.env").read_text().splitlines():
        if line.startswith("export "):
            out = _sh("bash", "-c", f"{line.split('#')[0]}; env -0")
            found.update(kv.split("=", 1) for kv in out.stdout.split("\0") if "=" in kv)
    return {k: v for k, v in found.items() if k.startswith(("CMAN_", "AWS_", "RAY_ADDRESS"))}


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[dict]:
    state = tmp_path / "cluster"
    env = {**os.environ, "CMAN_CLUSTER_PYTHON": sys.executable}
    up = _sh(str(CLUSTER / "up.sh"), str(state), env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"state": state, "env": _env_file(state)}
    finally:
        names = (state / "made").read_text() if (state / "made").exists() else ""
        down = _sh(str(CLUSTER / "down.sh"), str(state), timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        left = _sh("ip", "netns", "list").stdout + _sh("ip", "-o", "link").stdout
        for line in names.splitlines():
            assert line.split()[1] not in left, f"{line} survived down.sh"


def _tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every file under `root` (outside `skip`) with a hash of its content."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(path.is_relative_to(s) for s in skip):
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _node_pids(namespace: str) -> set[int]:
    return {int(p) for p in _sh("ip", "netns", "pids", namespace).stdout.split()}


def _wait(what: str, check, timeout_s: float, client=None, job_id: str | None = None):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        if client is not None:
            status = str(client.get_job_status(job_id))
            assert status not in {"FAILED", "STOPPED", "SUCCEEDED"}, (what, status, client.get_job_logs(job_id)[-4000:])
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.5)
    return found


def _bucket_files(env: dict[str, str], prefix: str) -> list[str]:
    from pyarrow import fs

    s3 = fs.S3FileSystem(
        endpoint_override=env["CMAN_S3_ENDPOINT"].removeprefix("http://"),
        scheme="http",
        region="us-east-1",
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    infos = s3.get_file_info(fs.FileSelector(f"cman/{prefix}", recursive=True))
    return [i.path.removeprefix(f"cman/{prefix}/") for i in infos if i.type == fs.FileType.File]


def test_a_sweep_across_two_nodes_in_s3_survives_losing_the_worker_node(cluster: dict, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from cman.data.demo import generate_demo_dataset

    state, env = cluster["state"], cluster["env"]
    data, pause, local = tmp_path / "data", tmp_path / "pause", state / "head" / "sweep"
    generate_demo_dataset(data, seed=0, counts={"train": 32, "val": 16, "test": 16})
    before = _tree(tmp_path, skip=(state,))
    sets = {
        "data.root": data,
        **ONE_LAYER,
        "training.batch_size": 16,
        "training.eval_batch_size": 32,
        "training.epochs": EPOCHS,
        "tune.num_samples": TRIALS,
        "tune.max_concurrent": 2,
        "tune.cpus_per_trial": 1,
        "tune.grace_period": EPOCHS,
    }
    entrypoint = ["cman", "tune", "--config", "configs/demo.yaml", "--local-dir", str(local)]
    entrypoint += ["--output-dir", f"'s3://cman/sweep?{env['CMAN_S3_QUERY']}'"]
    entrypoint += [f"--set {k}={v}" for k, v in sets.items()]
    client = JobSubmissionClient(env["RAY_ADDRESS"])
    job_id = client.submit_job(
        entrypoint=" ".join(entrypoint),
        runtime_env={
            "working_dir": str(REPO),
            "excludes": UPLOAD_EXCLUDES,
            # every trial waits before its second epoch (its first checkpoint is in the bucket) until told to go on
            "env_vars": {"CMAN_PAUSE_DIR": str(pause), "CMAN_PAUSE_AT": f"train-*-epoch-{EPOCHS}"},
        },
    )

    def both_nodes_paused() -> dict[str, set[int]] | None:
        paused = {int(p.read_text()) for p in pause.glob("*.paused")} if pause.is_dir() else set()
        on = {role: paused & _node_pids(env[f"CMAN_NS_{role.upper()}"]) for role in ("head", "worker")}
        return on if on["head"] and on["worker"] else None

    on = _wait("a trial paused on each node", both_nodes_paused, 600, client, job_id)
    assert len(on["head"]) == len(on["worker"]) == 1, on  # one CPU a node: one Train worker a node
    # the worker node's view of the head's directories is its own: the driver's MLflow store and the head's Ray
    # session are not there (whatever the worker writes under those paths stays on the worker)
    ray_tmp = next(line.split()[1] for line in (state / "made").read_text().splitlines() if line.startswith("dir "))
    in_worker = _sh("nsenter", "-t", str(next(iter(on["worker"]))), "-m", "find", str(state / "head"), ray_tmp)
    seen = set(in_worker.stdout.split())
    for path in (local / "mlflow.db", Path(ray_tmp) / "head" / "session_latest"):
        assert path.exists() and str(path) not in seen, (path, sorted(seen)[:20])

    # the worker node is lost once Ray Train registered the first checkpoint of the trial training there (a worker
    # killed before its controller took the report would restart from scratch): every process in its namespace
    killed_trial = next(p.name.split("-")[1] for p in pause.glob("*.paused") if int(p.read_text()) in on["worker"])
    snapshot = f"sweep/trials/{killed_trial}/ray_results/cman_train/checkpoint_manager_snapshot.json"
    _wait("checkpoint 1 registered", lambda: _registered_epoch(env, snapshot) >= EPOCHS - 1, 120, client, job_id)
    pids = _node_pids(env["CMAN_NS_WORKER"])
    subprocess.run(["kill", "-KILL", *map(str, pids)], check=False)
    (pause / "go").touch()
    killed_at = time.monotonic()
    _wait("the job to end", lambda: str(client.get_job_status(job_id)) in {"SUCCEEDED", "FAILED", "STOPPED"}, 900)
    logs = client.get_job_logs(job_id)
    assert str(client.get_job_status(job_id)) == "SUCCEEDED", logs[-6000:]
    print(f"\nsweep finished {time.monotonic() - killed_at:.0f} s after the worker node was killed")

    rows = list(csv.DictReader((local / "tune_results.csv").open()))
    assert len(rows) == TRIALS
    stored = _bucket_files(env, "sweep")
    for row in rows:  # every trial's checkpoints are in the bucket, the last one of its final epoch
        metas = [p for p in stored if p.startswith(f"trials/{row['trial_id']}/") and p.endswith("/metadata.json")]
        epochs = [json.loads(_read(env, f"sweep/{p}")).get("epoch") for p in metas if "/checkpoint_" in p]
        assert epochs and max(epochs) == EPOCHS, (row["trial_id"], epochs)
    results = [
        json.loads(line)
        for p in stored
        if p.startswith("tune/") and p.endswith("/result.json")
        for line in _read(env, f"sweep/{p}").splitlines()
        if line.strip()
    ]
    killed = [
        (r.get("trial_id"), r.get("epoch"), r.get("start_epoch")) for r in results if r.get("trial_id") == killed_trial
    ]
    # the trial whose Train worker died finished its last epoch in a restarted run that began after epoch 1
    assert killed and killed[-1][1:] == (EPOCHS, EPOCHS - 1), (killed_trial, killed, logs[-3000:])

    mlflow = MlflowClient(f"sqlite:///{local / 'mlflow.db'}")
    runs = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    assert runs and all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert mlflow.get_model_version_by_alias("cman", "champion") is not None

    # written only to the bucket and the driver's --local-dir: the test's folder is as before apart from the cluster
    # state (Ray's own temp dirs, the local dir) and the pause files
    after = _tree(tmp_path, skip=(state, pause))
    assert after == before, sorted(set(after) ^ set(before))[:20]
    outside = {p.name for p in (state / "head").iterdir()} - {"sweep"}
    assert not outside, outside


def _registered_epoch(env: dict[str, str], path: str) -> int:
    """Epoch of the checkpoint Ray Train's controller registered as its latest (its snapshot in the bucket), or 0."""
    try:
        latest = json.loads(_read(env, path)).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not written yet
        return 0
    return int((latest.get("metrics") or {}).get("epoch", 0))


def _read(env: dict[str, str], path: str) -> str:
    from pyarrow import fs

    s3 = fs.S3FileSystem(
        endpoint_override=env["CMAN_S3_ENDPOINT"].removeprefix("http://"),
        scheme="http",
        region="us-east-1",
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    with s3.open_input_stream(f"cman/{path}") as f:
        return f.read().decode()
