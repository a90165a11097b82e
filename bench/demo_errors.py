#!/usr/bin/env python
"""Where a demo model's top-1 results go wrong: errors by attribute (size, colour, shape, position), per direction.

    python bench/demo_errors.py --checkpoint outputs/quickstart/best [--data data/demo] [--split test]

The embedded demo's `group` is `size-colour-shape-position`; a top-1 result outside the query's group is wrong in at
least one of them. Per direction: queries, wrong top-1 results, and how many of those got each attribute wrong (a
result wrong in two attributes counts twice). Also the six-direction R@1. Prints JSON.
"""

from __future__ import annotations

import argparse
import os

from emit import emit_json  # noqa: E402 - bench/ is sys.path[0] when a script here runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ATTRIBUTES = ("size", "colour", "shape", "position")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default=None, help="dataset root (default: the checkpoint config's data.root)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/demo_errors.json)")
    args = parser.parse_args()

    from cman.metrics import attribute_errors, evaluate_embeddings
    from cman.models.cman import CMAN
    from cman.steps import amp_dtype, compute_embeddings, resolve_device
    from cman.training import load_items, make_loader

    model = CMAN.from_pretrained(args.checkpoint)
    config = model.config if args.data is None else model.config.with_overrides({"data.root": args.data})
    device = resolve_device(config.training.device)
    loader = make_loader(config, model, load_items(config, args.split), train=False)
    sets = compute_embeddings(model.to(device), loader, device, amp_dtype(device, config.training.mixed_precision))
    recall = evaluate_embeddings(sets)["directions"]
    errors = attribute_errors(sets, ATTRIBUTES)
    for name, row in errors.items():
        row["R@1"] = round(recall[name]["R@1"], 1)
    emit_json({"checkpoint": str(args.checkpoint), "split": args.split, "errors": errors}, "demo_errors", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
