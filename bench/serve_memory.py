#!/usr/bin/env python
"""Memory a Serve replica holds for its model: the whole checkpoint (every replica, before) vs its own part (now).

    python bench/serve_memory.py [--configs demo pretrained_text]

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
    emit_json(result, "serve_memory", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
