#!/usr/bin/env python
"""Where Ray Train's time goes: the same config in-process and through Ray Train (one worker), back to back.

    python bench/ray_overhead.py --config configs/demo.yaml --epochs 4 [--cpus 2] [--set k=v ...]

Both runs use the same data, seed, CPU count and torch thread count (`training.num_threads = --cpus`; the Ray worker
reserves `--cpus` CPUs). Per epoch, `cman.training.fit` records the train time, the validation time and the wall
clock at which the epoch started, so an epoch's full cost (train + validate + report + checkpoint) is the gap to
the next epoch's start. Prints JSON: `in_process_epoch_s` and `ray_epoch_s` (medians over the epochs after the first),
both walls, and the breakdown (train, validation, report + checkpoint, Ray start, worker launch + setup, finish =
export + test evaluation). The data is the embedded demo dataset, generated into a temporary directory when
`data.root` does not exist. Needs the shared lock on a shared machine: `flock /tmp/cman-ray.lock python ...`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from emit import emit_json  # noqa: E402 - bench/ is sys.path[0] when a script here runs

from cman.config import load_config, parse_override  # noqa: E402


def epoch_breakdown(history: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over epochs 2..N-1 (each needs the next epoch's start): full epoch, train, validation, the rest."""
    rows = [(h, nxt["started_at"] - h["started_at"]) for h, nxt in zip(history[1:], history[2:], strict=False)]
    if not rows:
        raise SystemExit("--epochs must be at least 3 (medians over the epochs after the first need two gaps)")
    epoch = statistics.median(gap for _, gap in rows)
    train = statistics.median(h["seconds"] for h, _ in rows)
    val = statistics.median(h["val_seconds"] for h, _ in rows)
    return {"epoch_s": epoch, "train_s": train, "val_s": val, "report_checkpoint_other_s": epoch - train - val}


def run_in_process(config: Any, out: Path) -> dict[str, Any]:
    from cman.training import fit

    start = time.time()
    report = fit(config, out, resume=False, progress=False)
    end = time.time()
    history = report["history"]
    return {
        "wall_s": end - start,
        "setup_s": history[0]["started_at"] - start,
        "finish_s": end - (history[-1]["started_at"] + history[-1]["seconds"] + history[-1]["val_seconds"]),
        **epoch_breakdown(history),
    }


def run_ray(config: Any, out: Path, cpus: int) -> dict[str, Any]:
    import ray

    from jobs import cluster
    from jobs.train import run_training

    start = time.time()
    cluster.connect(num_cpus=cpus, dashboard=True)
    connected = time.time()
    try:
        report = run_training(config, out, resume=False, track=True)
    finally:
        ray.shutdown()
    end = time.time()
    history = report["history"]
    return {
        "wall_s": end - start,
        "ray_start_s": connected - start,
        "worker_launch_and_setup_s": history[0]["started_at"] - connected,
        "finish_s": end - (history[-1]["started_at"] + history[-1]["seconds"] + history[-1]["val_seconds"]),
        **epoch_breakdown(history),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/ray_overhead.json)")
    args = parser.parse_args()
    overrides = dict(parse_override(o) for o in args.overrides)
    base = {
        "training.epochs": args.epochs,
        "training.num_threads": args.cpus,
        "ray.num_workers": 1,
        "ray.resources_per_worker": {"CPU": args.cpus},
        **overrides,
    }
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.config, base)
        if not config.data.root or not Path(config.data.root).is_dir():
            from cman.data.demo import generate_demo_dataset

            generate_demo_dataset(Path(tmp) / "data", seed=0)
            config = config.with_overrides({"data.root": str(Path(tmp) / "data")})
        torch.set_num_threads(args.cpus)
        in_process = run_in_process(config, Path(tmp) / "in_process")
        ray_run = run_ray(config, Path(tmp) / "ray", args.cpus)
    result = {
        "config": args.config,
        "epochs": args.epochs,
        "cpus": args.cpus,
        "threads": args.cpus,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "load_avg_1m_at_end": os.getloadavg()[0],
        "in_process_epoch_s": in_process["epoch_s"],
        "ray_epoch_s": ray_run["epoch_s"],
        "ratio": ray_run["epoch_s"] / in_process["epoch_s"],
        "in_process_wall_s": in_process["wall_s"],
        "ray_wall_s": ray_run["wall_s"],
        "breakdown": {"in_process": in_process, "ray": ray_run},
    }
    emit_json(result, "ray_overhead", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
