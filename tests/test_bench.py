"""Smoke run of bench/train_throughput.py --dtype both (tiny sizes, not timed): it runs and prints the expected JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tiny import REPO

KEYS = {
    "preset",
    "device",
    "dtype",
    "batch_size",
    "steps",
    "samples_per_s",
    "flops_per_step",
    "achieved_flops_per_s",
    "gemm",
    "mfu",
    "loader",
    "bound",
    "attention",
    "parameters",
    "peak_memory_bytes",
}


def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "train_throughput.py"),
        "--config",
        "configs/demo.yaml",
        "--preset",
        "demo",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "4",
        "--loader-items",
        "8",
        "--gemm-size",
        "256",
        "--gemm-seconds",
        "0.2",
        "--synthetic",
        "--dtype",
        "both",
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    both = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert both == json.loads(out.read_text())
    # fp32 and bf16 side by side in one process, each MFU against the GEMM rate of its own dtype
    assert both["dtype"] == "both" and set(both["runs"]) == {"fp32", "bf16"}
    assert both["runs"]["bf16"]["gemm"]["dtype"] == "bfloat16" and both["runs"]["fp32"]["gemm"]["dtype"] == "float32"
    assert both["bf16_speedup_step"] > 0 and both["cpu_bf16_units"] in (True, False)
    assert math.isfinite(both["runs"]["bf16"]["loss"])
    printed = both["runs"]["fp32"]
    assert KEYS <= printed.keys()
    assert printed["steps"] == 2 and printed["batch_size"] == 4 and printed["dtype"] == "fp32"
    # shape and sanity only: MFU is a ratio of two timings (a 0.2 s GEMM "peak" on a loaded box can be low, so the
    # ratio can pass 1), which a smoke run cannot bound
    for key in ("flops_per_step", "samples_per_s", "achieved_flops_per_s", "mfu"):
        assert math.isfinite(printed[key]) and printed[key] > 0, (key, printed[key])
    assert printed["attention"] == {"text": "sdpa", "audio": "sdpa", "image": "sdpa"}
    loader = printed["loader"]
    assert loader["items"] == 8 and loader["uncached_samples_per_s"] > 0 and loader["cached_samples_per_s"] > 0
    assert set(printed["bound"]) == {"uncached", "cached"}
