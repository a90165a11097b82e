"""`ray job submit ... -- python -m jobs.train` against a real `ray start --head` cluster (tests/ray_cluster.py);
the job leaves checkpoints, the test report and an MLflow run."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray_cluster
from tiny import REPO

JOB_TIMEOUT_S = 420
# anchored to the working dir: a bare "data" would also leave out cman/data (unnoticed where cman is pip-installed -e)
UPLOAD_EXCLUDES = [
    "/.venv",
    "/.git",
    "/outputs",
    "/data",
    "/runs",
    "/ray_results",
    "/tests/artifacts",
    "/bench/results",
]


@pytest.fixture()
def head_node() -> Iterator[dict]:
    yield from ray_cluster.head_node()


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
            str(ray_cluster.VENV_BIN / "ray"),
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
