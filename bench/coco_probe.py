#!/usr/bin/env python
"""The frozen-feature ridge probe of issue 32 on a `cman data import-coco` output: what a linear map between frozen
pretrained encoders retrieves, the baseline that configs/coco.yaml has to beat.

    python bench/coco_probe.py --data D [--fit train|trainval] [--text-model DIR] [--image-model DIR]

Text: all-MiniLM-L6-v2's sentence embedding (last layer mean-pooled over real tokens, L2-normalised, as
sentence-transformers does). Image: EfficientNet-Lite0's pooled 1280-d feature (`cman.models.efficientnet`, with
`cman.data.processors.lite_image_processor`: EXIF orientation, shorter side to 224, centre crop, (x - 127) / 128).
A ridge regression (closed form, with intercept) maps text embeddings to image features; every caption of a training
photo is one pair. Its alpha is the one of a small grid with the best val rsum (both directions), fitted on train.
`--fit trainval` then refits on train + val with that alpha. Scored on test only (the photos are never fitted on),
5-caption protocol: text→image (each caption queries the split's photos; a hit is its own photo) and image→text
(each photo queries the split's captions; a hit is any of its captions), cosine similarity in image-feature space.
`--similarity centred` (default): the fitted photos' mean feature is subtracted from the photos and from the mapped
captions before the cosine (no test data involved). Lite0's pooled features follow a ReLU6, so all are positive and
share one large mean direction that dominates a raw cosine: `--similarity raw` scores without centring, 3-5 points
lower at text→image R@1. Prints this run's JSON; bench/results/coco_probe.json (or --out) keeps one entry per
setting (`train`, `trainval`, `train-raw`, `trainval-raw`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PRETRAINED = REPO / "../shared/data/pretrained"  # as configs/coco.yaml names it, relative to the repo root
RESULTS = REPO / "bench" / "results" / "coco_probe.json"
ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
KS = (1, 5, 10)


def load_split(root: Path, split: str) -> tuple[list[str], list[str], dict[str, Path]]:
    """Captions, their photo's group, and the split's photos (group → path, first-seen order)."""
    from cman.data.dataset import load_split as cman_load_split

    items = [x for x in cman_load_split(root, split) if x.caption is not None and x.image_path is not None]
    photos: dict[str, Path] = {}
    for item in items:
        if photos.setdefault(item.group, item.image_path) != item.image_path:
            raise ValueError(f"{split}: group {item.group} has two photos")
    return [x.caption for x in items], [x.group for x in items], photos


def text_embeddings(model_dir: Path, captions: list[str], batch: int = 128) -> np.ndarray:
    """(captions, 384) sentence embeddings: masked mean of the last layer, L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(captions), batch):
            enc = tokenizer(captions[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state  # (batch, tokens, 384)
            mask = enc["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out).numpy().astype(np.float64)


def image_features(model_dir: Path, paths: list[Path], batch: int = 32) -> np.ndarray:
    """(photos, 1280) pooled Lite0 features of the centre-cropped photos."""
    import torch

    from cman.data.image import decode_image
    from cman.data.processors import ImageProcessor, lite_image_processor
    from cman.models.efficientnet import lite_config, load_efficientnet_lite

    model = load_efficientnet_lite(model_dir)
    processor = ImageProcessor(lite_image_processor(lite_config(model_dir).image_size))
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            pixels = processor.collate([processor.features(decode_image(p)) for p in paths[i : i + batch]])
            out.append(model(**pixels).pooler_output)  # (batch, 1280)
    return torch.cat(out).numpy().astype(np.float64)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """W, b minimising |(x - mean) W + mean_y - y|^2 + alpha |W|^2 (intercept not penalised)."""
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - my))
    return w, my - mx @ w


def recalls(sim: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """R@K (%) of each row of `sim` (queries x gallery): some relevant gallery item among the K most similar."""
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    first = np.where(hits.any(1), hits.argmax(1), sim.shape[1])  # rank of the first relevant item, 0-based
    return {f"R@{k}": round(100 * float((first < k).mean()), 1) for k in KS}


def evaluate(
    text_mapped: np.ndarray,
    caption_groups: list[str],
    photos: np.ndarray,
    photo_groups: list[str],
    centre: np.ndarray | float,
) -> dict[str, object]:
    """Both directions' recalls; `centre` (a feature vector, or 0) is subtracted from both sides before the cosine."""

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    sim = unit(text_mapped - centre) @ unit(photos - centre).T  # (captions, photos)
    relevant = np.array(caption_groups)[:, None] == np.array(photo_groups)[None, :]
    t2i, i2t = recalls(sim, relevant), recalls(sim.T, relevant.T)
    return {
        "text_to_image": {**t2i, "queries": sim.shape[0], "gallery": sim.shape[1]},
        "image_to_text": {**i2t, "queries": sim.shape[1], "gallery": sim.shape[0]},
        "rsum": round(sum(t2i.values()) + sum(i2t.values()), 1),
    }


def machine() -> dict[str, object]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "processor": platform.processor(), "cores": os.cpu_count(), "platform": platform.platform()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a `cman data import-coco` output directory")
    parser.add_argument("--fit", choices=("train", "trainval"), default="train")
    parser.add_argument("--similarity", choices=("centred", "raw"), default="centred")
    parser.add_argument("--text-model", default=str(PRETRAINED / "all-MiniLM-L6-v2"))
    parser.add_argument("--image-model", default=str(PRETRAINED / "efficientnet-lite0"))
    parser.add_argument("--out", default=str(RESULTS), help="JSON file keeping one entry per setting")
    args = parser.parse_args()
    started = time.perf_counter()
    root, text_dir, image_dir = Path(args.data), Path(args.text_model).resolve(), Path(args.image_model).resolve()

    splits = {s: load_split(root, s) for s in ("train", "val", "test")}
    text = {s: text_embeddings(text_dir, caps) for s, (caps, _, _) in splits.items()}
    images = {s: image_features(image_dir, list(photos.values())) for s, (_, _, photos) in splits.items()}
    photo_groups = {s: list(photos) for s, (_, _, photos) in splits.items()}

    def pairs(split_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for s in split_names:
            index = {g: i for i, g in enumerate(photo_groups[s])}
            xs.append(text[s])
            ys.append(images[s][[index[g] for g in splits[s][1]]])  # each caption's own photo
        return np.concatenate(xs), np.concatenate(ys)

    def score(split: str, fit: tuple[np.ndarray, np.ndarray], alpha: float) -> dict[str, object]:
        w, b = fit_ridge(*fit, alpha)
        centre = fit[1].mean(0) if args.similarity == "centred" else 0.0
        return evaluate(text[split] @ w + b, splits[split][1], images[split], photo_groups[split], centre)

    train = pairs(("train",))
    grid = {alpha: score("val", train, alpha) for alpha in ALPHAS}
    alpha = max(ALPHAS, key=lambda a: grid[a]["rsum"])
    fit_splits = ("train",) if args.fit == "train" else ("train", "val")
    fitted = pairs(fit_splits)
    test = score("test", fitted, alpha)
    test_by_alpha = {str(a): score("test", fitted, a) for a in ALPHAS}

    result = {
        "setting": {
            "fit": args.fit,
            "fit_splits": list(fit_splits),
            "fit_photos": sum(len(photo_groups[s]) for s in fit_splits),
            "fit_pairs": len(fitted[0]),
            "data": str(root.resolve()),
            "text_model": str(text_dir),
            "image_model": str(image_dir),
            "text_features": "mean-pooled last layer (attention mask), L2-normalised",
            "image_features": "pooled head features, shorter side 224 + centre crop 224",
            "similarity": f"{args.similarity} cosine in image-feature space (text mapped by ridge; both L2-normalised"
            + (", after subtracting the fitted photos' mean feature)" if args.similarity == "centred" else ")"),
        },
        "alpha": alpha,
        "alpha_chosen_on": "val rsum (both directions), ridge fitted on train",
        "val_by_alpha": {str(a): grid[a] for a in ALPHAS},
        "test": test,
        "test_by_alpha": {"note": "diagnostic only: alpha is chosen on val", **test_by_alpha},
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        kept = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        kept = {}
    kept = kept if isinstance(kept, dict) and "setting" not in kept else {}
    kept[args.fit + ("-raw" if args.similarity == "raw" else "")] = result
    out.write_text(json.dumps(kept, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
