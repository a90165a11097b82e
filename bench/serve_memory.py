#!/usr/bin/env python
"""Memory a Serve replica holds for its model: the whole checkpoint (every replica, before) vs its own part (now).

    python bench/serve_memory.py [--configs demo pretrained_text]
    python bench/serve_memory.py --configs demo pretrained --replica-latency audio --seconds 2 --repeats 50

`--replica-latency M` adds, per config, the encoder replica of modality M as serve_app runs it
(`serve_app.encoders.ModalityEncoderServer`, one torch thread as a replica of `num_cpus_per_replica` < 1 gets):
its memory growth and the p50/p95 seconds of encoding one request (a `--seconds` WAV clip or a caption, decode +
features + forward, one at a time). configs/pretrained.yaml's audio replica is Whisper tiny.en's encoder, the
demo's is its random-init AST.

Per config, a fresh model is built (`build_model`; the pretrained config loads all-MiniLM-L6-v2 from
../shared/data/pretrained) and saved as a checkpoint. Then, each in a fresh Python process, what a replica loads
the way serve_app does it (`CMAN.from_pretrained(ckpt, modalities=[m]).merge_adapters()` for the encoder
deployment of modality m; `modalities=[]` — fusion + projections — for the Retriever) and, for comparison, the whole
checkpoint (what every replica loaded before replicas loaded only their part). Reported per role: parameters held,
and the process's resident memory growth from "torch + cman imported" to "model loaded" (VmRSS, MiB). Prints JSON; the
served demo app has 4 model-holding replicas (3 encoders + Retriever). Model memory only: Ray's and FastAPI's own
per-process memory is the same in both layouts and not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from emit import emit_json  # noqa: E402 - bench/ is sys.path[0] when a script here runs

REPO = Path(__file__).resolve().parents[1]
ROLES = {"text": ["text"], "audio": ["audio"], "image": ["image"], "retriever": [], "whole": None}

PROBE = r"""
import gc, json, sys
import torch  # noqa: F401
from cman.models.cman import CMAN

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

before = rss_kib()
modalities = json.loads(sys.argv[2])
model = CMAN.from_pretrained(sys.argv[1], modalities=modalities)
if modalities is None or modalities:
    model.merge_adapters()
gc.collect()
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"params": params, "rss_growth_mib": round((rss_kib() - before) / 1024, 1)}))
"""


REPLICA_PROBE = r"""
import asyncio, io, json, statistics, sys, time
import numpy as np
import soundfile as sf
import torch  # noqa: F401
from serve_app.encoders import ModalityEncoderServer

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

checkpoint, modality, seconds, repeats = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
before = rss_kib()
server = ModalityEncoderServer(checkpoint, modality)
growth = (rss_kib() - before) / 1024
if modality == "audio":
    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV")
    payload = buf.getvalue()
elif modality == "text":
    payload = "a small red circle on the left"
else:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 40, 40)).save(buf, format="PNG")
    payload = buf.getvalue()
encode = ModalityEncoderServer.encode.__wrapped__
times = []
for i in range(repeats + 2):  # two warm-up requests
    start = time.perf_counter()
    (answer,) = asyncio.run(encode(server, [payload]))
    times.append(time.perf_counter() - start)
    assert "tokens" in answer, answer
times = sorted(times[2:])
print(json.dumps({
    "threads": torch.get_num_threads(), "parameters": server.parameters, "rss_growth_mib": round(growth, 1),
    "p50_s": round(statistics.median(times), 4), "p95_s": round(times[int(0.95 * (len(times) - 1))], 4),
    "tokens": int(answer["tokens"].shape[0]), "input_seconds": seconds if modality == "audio" else None,
}))
"""


def probe_replica(checkpoint: Path, modality: str, seconds: float, repeats: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", REPLICA_PROBE, str(checkpoint), modality, str(seconds), str(repeats)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def save_checkpoint(config_name: str, out: Path) -> Path:
    from cman.config import load_config
    from cman.models import build_model

    config = load_config(REPO / "configs" / f"{config_name}.yaml")
    captions = ["a small red circle on the left", "a large blue square on the right"] * 8
    model = build_model(config, captions)
    return model.save_pretrained(out / config_name)


def probe(checkpoint: Path, modalities: list[str] | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(checkpoint), json.dumps(modalities)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["demo", "pretrained_text"])
    parser.add_argument("--replica-latency", choices=["text", "audio", "image"], help="also time this replica")
    parser.add_argument("--seconds", type=float, default=2.0, help="audio clip length for --replica-latency audio")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/serve_memory.json)")
    args = parser.parse_args()
    os.chdir(REPO)  # configs name ../shared/data/pretrained relative to the project root
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            checkpoint = save_checkpoint(name, Path(tmp))
            roles = {role: probe(checkpoint, mods) for role, mods in ROLES.items()}
            replicas = ("text", "audio", "image", "retriever")
            result[name] = {
                "per_role": roles,
                "four_replicas_now": {
                    "params": sum(roles[r]["params"] for r in replicas),
                    "rss_growth_mib": round(sum(roles[r]["rss_growth_mib"] for r in replicas), 1),
                },
                "four_replicas_before": {
                    "params": 4 * roles["whole"]["params"],
                    "rss_growth_mib": round(4 * roles["whole"]["rss_growth_mib"], 1),
                },
            }
            if args.replica_latency:
                replica = probe_replica(checkpoint, args.replica_latency, args.seconds, args.repeats)
                result[name][f"{args.replica_latency}_replica"] = replica
    emit_json(result, "serve_memory", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
