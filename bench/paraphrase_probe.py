#!/usr/bin/env python
"""How much of the paraphrase gap a frozen text encoder can close: linear probes on its sentence embeddings.

    python bench/paraphrase_probe.py --data data/demo [--encoder ../shared/data/pretrained/all-MiniLM-L6-v2]

The demo's captions name four attributes (size, colour, shape, position: the item's `group`). Per attribute, a
logistic-regression probe is fitted on the frozen encoder's mean-pooled sentence embeddings of the `train` captions
and scored on `test` and on `test_paraphrase` (the same items, reworded with words never seen in training). An item
is retrieved at rank 1 only if every attribute is read right, so the probes' joint accuracy on `test_paraphrase` is
what a model built on this frozen sentence embedding can be expected to reach there, whatever is trained above it.
Also reported: nearest-caption accuracy (each reworded caption's nearest `test` caption, untrained). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from emit import emit_json  # noqa: E402 - bench/ is sys.path[0] when a script here runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ATTRIBUTES = ("size", "colour", "shape", "position")  # the order of the parts of an item's `group`


def load_split(root: Path, split: str) -> list[dict]:
    data = json.loads((root / "metadata" / f"{split}_metadata.json").read_text())
    return data["items"] if isinstance(data, dict) else data


def sentence_embeddings(encoder: str, captions: list[str]) -> np.ndarray:
    """Mean of the last layer over real tokens, L2-normalised (sentence-transformers pooling)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(encoder), AutoModel.from_pretrained(encoder).eval()
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1).numpy()


def main() -> int:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a `cman demo-data` directory")
    parser.add_argument("--encoder", default="../shared/data/pretrained/all-MiniLM-L6-v2")
    parser.add_argument("--out", default=None, help="JSON output (default bench/results/paraphrase_probe.json)")
    args = parser.parse_args()
    root = Path(args.data)
    splits = {s: load_split(root, s) for s in ("train", "test", "test_paraphrase")}
    emb = {s: sentence_embeddings(args.encoder, [x["caption"] for x in items]) for s, items in splits.items()}
    labels = {s: np.array([x["group"].split("-") for x in items]) for s, items in splits.items()}

    probes: dict[str, dict[str, float]] = {}
    joint = {s: np.ones(len(splits[s]), dtype=bool) for s in ("test", "test_paraphrase")}
    for k, name in enumerate(ATTRIBUTES):
        clf = LogisticRegression(C=10.0, max_iter=2000).fit(emb["train"], labels["train"][:, k])
        probes[name] = {}
        for split in joint:
            right = clf.predict(emb[split]) == labels[split][:, k]
            joint[split] &= right
            probes[name][split] = round(100 * float(right.mean()), 1)
    nearest = (emb["test_paraphrase"] @ emb["test"].T).argmax(1)
    same_group = labels["test"][nearest] == labels["test_paraphrase"]
    result = {
        "encoder": args.encoder,
        "data": str(root),
        "items": {s: len(v) for s, v in splits.items()},
        "probe_accuracy_pct": probes,
        "probe_all_four_pct": {s: round(100 * float(v.mean()), 1) for s, v in joint.items()},
        "nearest_test_caption_pct": {
            **{name: round(100 * float(same_group[:, k].mean()), 1) for k, name in enumerate(ATTRIBUTES)},
            "all_four": round(100 * float(same_group.all(1).mean()), 1),
        },
    }
    emit_json(result, "paraphrase_probe", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
