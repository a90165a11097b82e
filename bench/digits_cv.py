"""Leave-one-speaker-out cross-validation on the spoken digits (FSDD, six speakers): does speech generalise?

Fold k tests on speaker k, validates on the next speaker (sorted, cyclic) and trains on the other four; each fold
imports its own dataset (`cman data import-digits`) and trains a config (`--config`, default `configs/digits.yaml`)
in this process. Prints JSON with P@1 and mAP@R per direction per fold, and their mean and standard deviation over
the folds; also written to bench/results/digits_cv.json (or --out).

    nice -n 10 python bench/digits_cv.py                      # all six folds, ~50 min on 2 cores
    python bench/digits_cv.py --seeds 0 1                     # each fold twice: the mean is over seeds, then folds
    python bench/digits_cv.py --folds theo --epochs 5         # one quick fold
    python bench/digits_cv.py --config configs/digits_whisper.yaml --seeds 0 1   # any config (frozen Whisper + LoRA)

One training run of a fold moves by up to ~20 points audio->text P@1 with the seed alone (a whole digit of the test
speaker, 10 points, flips), so `--seeds` is how two configs should be compared. Each run also records, per digit,
the test speaker's audio->text P@1 and which digit its clips are taken for (`audio->text_by_group`).

A benchmark, not a test: tests/test_augment.py covers the fold plan, the per-fold import on a few items and how
runs of several seeds are averaged and summarised.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DIRECTIONS = ("text->audio", "audio->text", "text->image", "image->text", "audio->image", "image->audio")
METRICS = ("P@1", "mAP@R")


def fold_plan(speakers: list[str]) -> list[dict[str, Any]]:
    """One fold per speaker: test = that speaker, val = the next one (sorted, cyclic), train = the rest."""
    names = sorted(set(speakers))
    if len(names) < 3:
        raise ValueError(f"leave-one-speaker-out needs at least 3 speakers (test, val, train); got {names}")
    plan = []
    for k, test in enumerate(names):
        val = names[(k + 1) % len(names)]
        plan.append({"test": test, "val": val, "train": [s for s in names if s not in (test, val)]})
    return plan


def fsdd_speakers(fsdd_dir: Path) -> list[str]:
    from cman.data.importers import _find_recordings

    return sorted({r.speaker for r in _find_recordings(fsdd_dir)})


def run_fold(fold: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Import the fold's dataset, train `args.config` on it once per seed, return its test metrics (the mean over
    seeds in `metrics`, each run in `runs`)."""
    from cman.data.importers import import_digits

    work = Path(args.work_dir) / fold["test"]
    counts = import_digits(
        args.fsdd,
        work / "data",
        test_speakers=[fold["test"]],
        val_speakers=[fold["val"]],
        limit_per_speaker_digit=args.limit,
    )
    seeds = args.seeds or [None]
    runs = [train_once(work, seed, args) for seed in seeds]
    metrics = {
        d: {m: round(statistics.fmean(r["metrics"][d][m] for r in runs), 2) for m in METRICS}
        for d in runs[0]["metrics"]
    }
    return {
        **fold,
        "items": counts,
        "seconds": round(sum(r["seconds"] for r in runs), 1),
        "metrics": metrics,
        "runs": runs,
    }


def train_once(work: Path, seed: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """Train on the fold's dataset under `work` (run dir `run` or `run_seed<k>`), evaluate checkpoints/best."""
    from cman.config import load_config
    from cman.engine import fit

    run_dir = work / ("run" if seed is None else f"run_seed{seed}")
    overrides = {"data.root": str(work / "data"), "output_dir": str(run_dir), **dict(args.set)}
    if args.epochs:
        overrides["training.epochs"] = args.epochs
    if seed is not None:
        overrides["training.seed"] = seed
    config = load_config(args.config, overrides)
    start = time.perf_counter()
    report = fit(config, run_dir, resume=False, progress=False)
    directions = report["test"]["directions"]
    return {
        "seed": config.training.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "best_epoch": max(report["history"], key=lambda r: r["val_rsum"])["epoch"],
        "metrics": {d: {m: round(directions[d][m], 2) for m in METRICS} for d in DIRECTIONS if d in directions},
        "audio->text_by_group": audio_text_by_group(run_dir / "checkpoints" / "best", work / "data"),
    }


def audio_text_by_group(checkpoint: Path, data_root: Path, split: str = "test") -> dict[str, Any]:
    """Per digit of `split`: audio->text P@1 and the digits its clips' top-1 captions belong to (cman.metrics)."""
    from cman.metrics import dedupe, group_confusion
    from cman.modality import Modality
    from cman.models.cman import CMAN
    from cman.steps import compute_embeddings, resolve_device
    from cman.training import load_items, make_loader

    model = CMAN.from_pretrained(checkpoint)
    config = model.config.with_overrides({"data.root": str(data_root)})
    device = resolve_device(config.training.device)
    loader = make_loader(config, model.to(device), load_items(config, split), train=False)
    sets = compute_embeddings(model, loader, device)
    table = group_confusion(dedupe(sets[Modality.AUDIO]), dedupe(sets[Modality.TEXT]))
    return {g: {**row, "P@1": round(row["P@1"], 2)} for g, row in sorted(table.items())}


def summarise(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (over folds) of each direction's P@1 and mAP@R."""
    out: dict[str, Any] = {}
    for direction in DIRECTIONS:
        for metric in METRICS:
            values = [f["metrics"][direction][metric] for f in folds if direction in f["metrics"]]
            if values:
                out.setdefault(direction, {})[metric] = {
                    "mean": round(statistics.fmean(values), 2),
                    "std": round(statistics.pstdev(values), 2),
                    "min": min(values),
                }
    return out


def summarise_by_seed(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """`summarise` of each seed's runs alone (how far the six-fold mean moves with the seed)."""
    seeds = sorted({r["seed"] for f in folds for r in f.get("runs", [])})
    return {
        str(seed): summarise([{"metrics": r["metrics"]} for f in folds for r in f["runs"] if r["seed"] == seed])
        for seed in seeds
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsdd", default=str(REPO.parent / "shared" / "data" / "fsdd"))
    parser.add_argument("--config", default=str(REPO / "configs" / "digits.yaml"))
    parser.add_argument("--folds", nargs="*", help="test speakers to run (default: all)")
    parser.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    parser.add_argument("--limit", type=int, default=None, help="takes per (speaker, digit), for quick runs")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="train each fold once per seed (default: the config's)"
    )
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    parser.add_argument("--work-dir", default=str(REPO / "outputs" / "digits_cv"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "digits_cv.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = fold_plan(fsdd_speakers(Path(args.fsdd)))
    if args.folds:
        unknown = sorted(set(args.folds) - {f["test"] for f in plan})
        if unknown:
            parser.error(f"--folds: unknown speaker(s) {unknown}")
        plan = [f for f in plan if f["test"] in args.folds]
    folds = []
    for fold in plan:
        folds.append(run_fold(fold, args))
        print(json.dumps(folds[-1]), file=sys.stderr, flush=True)  # progress: one line per finished fold
    result = {
        "benchmark": "digits_cv",
        "config": os.path.relpath(Path(args.config).resolve(), REPO),
        "overrides": dict(args.set),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "folds": folds,
        "summary": summarise(folds),
        "summary_by_seed": summarise_by_seed(folds),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
