"""The same 4-trial sweep on a one-node and a two-node cluster (1 CPU a node), wall times side by side in one run.

Each cluster comes from tools/cluster/up.sh (network namespaces, an S3-compatible store; needs root); the sweep is
submitted with `ray job submit` semantics (JobSubmissionClient, the repo as working dir), Ray's results go to the
bucket. Prints one JSON document and writes bench/results/cluster_sweep.json.

    sudo .venv/bin/python bench/cluster_sweep.py [--trials 4] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tools" / "cluster"
EXCLUDES = ["/.venv", "/.git", "/outputs", "/data", "/runs", "/tests/artifacts", "/bench/results"]
ONE_LAYER = {f"model.{m}.init.num_hidden_layers": 1 for m in ("text", "audio", "image")} | {"model.fusion.layers": 1}


def cluster_env(state: Path) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", f". {state}/cluster.env; env -0"], capture_output=True, text=True, check=True)
    return dict(kv.split("=", 1) for kv in out.stdout.split("\0") if kv.startswith(("RAY_ADDRESS=", "CMAN_")))


def sweep_seconds(nodes: int, data: Path, work: Path, trials: int, epochs: int) -> dict:
    from ray.job_submission import JobStatus, JobSubmissionClient

    state = work / f"nodes{nodes}"
    env = {**os.environ, "CMAN_CLUSTER_PYTHON": sys.executable, "CMAN_CLUSTER_NODES": str(nodes)}
    up = subprocess.run([str(CLUSTER / "up.sh"), str(state)], env=env, capture_output=True, text=True)
    try:
        if up.returncode != 0:
            raise RuntimeError(up.stderr[-2000:])
        found = cluster_env(state)
        sets = {
            "data.root": data,
            **ONE_LAYER,
            "training.epochs": epochs,
            "training.batch_size": 16,
            "tune.num_samples": trials,
            "tune.max_concurrent": 2,
            "tune.cpus_per_trial": 1,
            "tune.grace_period": epochs,
        }
        entrypoint = f"cman tune --config configs/demo.yaml --local-dir {state}/head/sweep "
        entrypoint += f"--output-dir 's3://cman/sweep?{found['CMAN_S3_QUERY']}' "
        entrypoint += " ".join(f"--set {k}={v}" for k, v in sets.items())
        client = JobSubmissionClient(found["RAY_ADDRESS"])
        start = time.monotonic()
        job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES})
        while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            time.sleep(1)
        seconds = time.monotonic() - start
        if status != JobStatus.SUCCEEDED:
            raise RuntimeError(client.get_job_logs(job)[-3000:])
        return {"nodes": nodes, "cpus_per_node": 1, "seconds": round(seconds, 1)}
    finally:
        subprocess.run([str(CLUSTER / "down.sh"), str(state)], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    from cman.data.demo import generate_demo_dataset

    with tempfile.TemporaryDirectory(prefix="cman-cluster-bench-") as tmp:
        work = Path(tmp)
        generate_demo_dataset(work / "data", seed=0, counts={"train": 48, "val": 24, "test": 24})
        runs = [sweep_seconds(n, work / "data", work, args.trials, args.epochs) for n in (1, 2)]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    result = {
        "benchmark": "cluster_sweep",
        "trials": args.trials,
        "epochs": args.epochs,
        "runs": runs,
        "two_over_one_node_speedup": round(runs[0]["seconds"] / runs[1]["seconds"], 2),
        "machine": f"{cpu}, {os.cpu_count()} cores",
    }
    print(json.dumps(result, indent=2))
    out = REPO / "bench" / "results" / "cluster_sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
