#!/usr/bin/env python
"""What bf16 changes for a trained checkpoint: retrieval, top-10 results, encoder latency and the loss.

    python bench/precision_check.py --checkpoint outputs/quickstart/best [--data data/demo] [--split test]

One process, one checkpoint, the same test items, fp32 and bf16 autocast side by side (both on this machine; on a
CPU without bf16 units bf16 is emulated, so its latency there says nothing about an AMX box, its numerics do):
- six-direction R@1 of each, and the top-10 agreement: per query, the share of its fp32 top-10 gallery items that
  bf16 also returns (gallery and queries embedded in the same dtype, as a bf16-served index would be);
- per modality, the encoder's p50 seconds for a batch of `--batch` items, each dtype, and their ratio;
- the loss of one train batch: fp32 model + fp32 loss, bf16 model + fp32 loss (what `cman.steps.train_step_loss`
  does), bf16 model + bf16 loss (the similarity matrix under autocast), and how many hinge terms are active in each.
Prints JSON (bench/results/precision_check.json unless --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
from emit import emit_json  # noqa: E402 - bench/ is sys.path[0] when a script here runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DTYPES = ("fp32", "bf16")


def top_k_agreement(sets: dict, k: int = 10, names: tuple[str, str] = DTYPES) -> dict[str, float]:
    """Per direction, the mean share of each query's top-k under `names[0]` (fp32) that `names[1]` (bf16) also
    returns."""
    from cman.metrics import DIRECTIONS, _parse_direction, dedupe

    out = {}
    for name in DIRECTIONS:
        src, dst = _parse_direction(name)
        tops = []
        for dtype in names:
            query, gallery = dedupe(sets[dtype][src]), dedupe(sets[dtype][dst])
            scores = query.embeddings @ gallery.embeddings.T  # (queries, gallery)
            top = np.argsort(-scores, axis=1)[:, :k]  # (queries, k)
            tops.append([{gallery.keys[j] for j in row} for row in top])
        out[name] = float(np.mean([len(a & b) / len(a) for a, b in zip(*tops, strict=True)]))
    return out


def encoder_latency(model, loader, device, repeats: int) -> dict[str, dict[str, float]]:
    """Per modality: p50 seconds of one encoder forward on the first batch, fp32 and bf16, and bf16 / fp32."""
    import torch

    from cman.steps import autocast, to_device

    batch = to_device(next(iter(loader)), device)
    out: dict[str, dict[str, float]] = {}
    for modality, inputs in batch["inputs"].items():
        encoder = model.encoders[modality.value]
        times: dict[str, float] = {}
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            samples = []
            for _ in range(repeats + 1):  # the first is warm-up
                started = time.perf_counter()
                with torch.no_grad(), autocast(device, dtype):
                    encoder(inputs)
                samples.append(time.perf_counter() - started)
            times[name] = statistics.median(samples[1:])
        out[modality.value] = {**times, "bf16_over_fp32": times["bf16"] / times["fp32"]}
    return out


def loss_in_each_dtype(model, config, items, device) -> dict[str, dict[str, float]]:
    """One train batch's loss three ways, with the number of active hinges (cost > 0) of each."""
    import torch

    from cman.losses import CMANLoss
    from cman.steps import autocast, batch_embeddings, to_device
    from cman.training import make_loader

    loss_fn = CMANLoss.from_config(config.loss)
    batch = to_device(next(iter(make_loader(config, model, items, train=True))), device)
    out = {}
    with torch.no_grad():
        for label, model_dtype, loss_in_autocast in (
            ("fp32_model_fp32_loss", None, False),
            ("bf16_model_fp32_loss", torch.bfloat16, False),
            ("bf16_model_bf16_loss", torch.bfloat16, True),
        ):
            with autocast(device, model_dtype):
                emb = batch_embeddings(model, batch)
            if not loss_in_autocast:
                emb = {m: e.float() for m, e in emb.items()}
            with autocast(device, model_dtype if loss_in_autocast else None):
                terms = loss_fn(emb, batch["present"], batch["groups"])
                a, b = next(iter(emb.values())), list(emb.values())[1]
                sims = a @ b.T  # (batch, batch): one pair's similarity matrix
            margin = config.loss.margin
            active = int(((margin - sims.diagonal()[:, None] + sims) > 0).sum() - len(sims))
            out[label] = {"loss": float(terms["loss"]), "active_hinges_first_pair": active}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=None, help="dataset root (default: the checkpoint config's data.root)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch", type=int, default=16, help="items per batch for the latency measurement")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/precision_check.json)")
    args = parser.parse_args()

    import torch

    from cman.metrics import evaluate_embeddings
    from cman.models.cman import CMAN
    from cman.precision import cpu_has_bf16_units
    from cman.steps import compute_embeddings, resolve_device
    from cman.training import load_items, make_loader

    if args.threads:
        torch.set_num_threads(args.threads)
    model = CMAN.from_pretrained(args.checkpoint).merge_adapters()
    config = model.config if args.data is None else model.config.with_overrides({"data.root": args.data})
    device = resolve_device(config.training.device)
    model.to(device).eval()
    items = load_items(config, args.split)
    loader = make_loader(config, model, items, train=False, batch_size=args.batch)
    sets, recall = {}, {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        sets[name] = compute_embeddings(model, loader, device, dtype)
        recall[name] = {d: round(m["R@1"], 2) for d, m in evaluate_embeddings(sets[name])["directions"].items()}
    agreement = top_k_agreement(sets)
    result = {
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "machine": platform.processor() or platform.machine(),
        "cpu_bf16_units": cpu_has_bf16_units(),
        "threads": torch.get_num_threads(),
        "R@1": recall,
        "top10_agreement": agreement,
        "top10_agreement_mean": float(np.mean(list(agreement.values()))),
        "encoder_latency_s": encoder_latency(model, loader, device, args.repeats),
        "loss": loss_in_each_dtype(model, config, load_items(config, config.data.train_split), device),
        "torch": torch.__version__,
    }
    emit_json(result, "precision_check", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
