"""Tiny real media files for importer and folder tests: photos (PNG/JPEG via PIL) and spoken-caption-like WAVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image


def photo(path: Path, seed: int, size: int = 32) -> Path:
    """A small photo-like image (a colour gradient + noise) in the format of `path`'s extension."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    ramp = np.linspace(0, 1, size)[:, None, None] * rng.integers(-120, 120, size=3)
    pixels = np.clip(base + ramp + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def wav(path: Path, seed: int, seconds: float = 0.4, rate: int = 16_000) -> Path:
    """A short mono 16-bit WAV: a seeded chirp with noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 150 + 40 * (seed % 10)
    wave = 0.3 * np.sin(2 * np.pi * (f0 + 200 * t) * t) + 0.02 * rng.normal(size=t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave.astype(np.float32), rate, subtype="PCM_16")
    return path


def validate_train_index(root: Path, work: Path) -> dict[str, int]:
    """`cman data validate` passes on the dataset at `root`, one epoch of tiny in-process training runs on it, and its
    test split indexes; returns the index counts."""
    from tiny import REPO, tiny_demo_config

    from cman.cli import main
    from cman.training import fit
    from jobs.build_index import build_index

    assert (
        main(["data", "validate", "--config", str(REPO / "configs" / "demo.yaml"), "--set", f"data.root={root}"]) == 0
    )
    sets = {
        "training.epochs": 1,
        "training.batch_size": 8,
        "data.neighbour_batches": False,
        "data.cache_features": False,
    }
    report = fit(tiny_demo_config(root, **sets), work / "run", resume=False, progress=False)
    assert len(report["history"]) == 1 and report["test"]["rsum"] >= 0
    return build_index(work / "run" / "checkpoints" / "best", "test", work / "index", root=root, progress=False)
