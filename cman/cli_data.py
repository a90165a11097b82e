"""`cman demo-data` and `cman data ...`: validate a dataset, import real data into the seed layout.

Importers check their whole input first: every problem is printed (`file:line: what`), one error line goes to
stderr, the exit status is 1 and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from cman.cli_args import config_args, csv_list, flag, load_args_config

FLICKR8K_HELP = (
    "Flickr8k photos + captions with the Flickr Audio Caption Corpus (FACC) spoken captions, in their public layouts"
)
SKIP_BAD_HELP = "leave out what each problem touches (logged) instead of stopping; missing input files still stop"


def data_commands(sub: Any) -> None:
    """demo-data, data validate / import-digits / import-coco / import-flickr8k-audio / import-manifest."""
    p = sub.add_parser("demo-data", help="write the embedded offline tri-modal dataset")
    p.add_argument("out_dir", help="output directory (seed layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["small", "medium"], default="small")
    p.set_defaults(func=cmd_demo_data)

    data = sub.add_parser(
        "data", help="dataset tools: validate, import-digits, import-coco, import-flickr8k-audio, ..."
    )
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("validate", help="check every item of every split; list all problems, exit 1 if any")
    config_args(p)
    p.add_argument("--split", action="append", help="only these splits (default: train, val, test)")
    p.set_defaults(func=cmd_validate)
    p = dsub.add_parser("import-digits", help="real spoken digits (FSDD) + handwritten digits + number words")
    p.add_argument("out_dir")
    p.add_argument(
        "--fsdd",
        required=True,
        metavar="DIR",
        help="a copy of the Free Spoken Digit Dataset (its recordings/ folder inside; "
        "https://github.com/Jakobovski/free-spoken-digit-dataset, CC BY-SA 4.0)",
    )
    flag(p, "--test-speakers", default="theo", help="comma-separated speakers held out for test")
    flag(p, "--val-speakers", default="george", help="comma-separated speakers for validation")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_import_digits)
    p = dsub.add_parser("import-coco", help="COCO-style photos with 5 captions each (+ espeak-ng spoken captions)")
    p.add_argument("coco_dir")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_import_coco)
    _flickr8k_parser(dsub)
    _manifest_parser(dsub)


def _flickr8k_parser(dsub: Any) -> None:
    p = dsub.add_parser("import-flickr8k-audio", help=FLICKR8K_HELP, description=FLICKR8K_HELP)
    p.add_argument("out_dir", help="output directory (seed layout; replaced whole once everything is checked)")
    p.add_argument("--images", required=True, metavar="DIR", help="the photos (Flickr8k's Flicker8k_Dataset/)")
    p.add_argument("--captions", required=True, metavar="FILE", help="Flickr8k.token.txt (IMAGE#N<TAB>CAPTION)")
    p.add_argument("--audio", required=True, metavar="DIR", help="FACC's wavs/ (or the flickr_audio/ holding it)")
    p.add_argument("--wav2capt", required=True, metavar="FILE", help="FACC's wav2capt.txt (WAV IMAGE #N)")
    p.add_argument("--wav2spk", metavar="FILE", help="FACC's wav2spk.txt (WAV SPEAKER): keeps each item's speaker")
    p.add_argument("--splits", required=True, metavar="DIR", help="the folder of Flickr_8k.{train,dev,test}Images.txt")
    flag(p, "--skip-bad", action="store_true", help=SKIP_BAD_HELP)
    p.set_defaults(func=cmd_import_flickr8k_audio)


def _manifest_parser(dsub: Any) -> None:
    what = (
        "your own media listed in a CSV (header row) or JSONL manifest: columns image / audio / text (at least one "
        "a row), optional id / group / speaker / split; paths relative to the manifest"
    )
    p = dsub.add_parser("import-manifest", help="your own media from a CSV or JSONL manifest", description=what)
    p.add_argument("out_dir", help="output directory (seed layout; replaced whole once everything is checked)")
    p.add_argument("manifest", help="MANIFEST.csv or MANIFEST.jsonl")
    p.add_argument("--seed", type=int, default=0, help="seed of the split by group when there is no split column")
    flag(p, "--val-fraction", type=float, default=0.1, help="share of the groups for val (no split column)")
    flag(p, "--test-fraction", type=float, default=0.1, help="share of the groups for test (no split column)")
    flag(p, "--skip-bad", action="store_true", help="leave out the rows with problems (logged) instead of stopping")
    p.set_defaults(func=cmd_import_manifest)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from cman.data.demo import generate_demo_dataset

    counts = generate_demo_dataset(args.out_dir, seed=args.seed, size=args.size)
    print(f"demo dataset written to {args.out_dir}: {counts}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from cman.data.layout import existing_metadata

    config = load_args_config(args)
    splits = args.split or [config.data.train_split, config.data.val_split, config.data.test_split]
    for split in splits:  # a wrong root is one line before torch is imported
        existing_metadata(config.data.root or ".", split)

    from cman.data.dataset import load_split, problems_in_split
    from cman.data.processors import build_processor

    items = {s: load_split(config.data.root or ".", s) for s in splits}
    captions = [i.caption for i in items[splits[0]] if i.caption]
    processors = {m: build_processor(m, config.model.encoder(m), captions) for m in config.model.modalities}
    problems = []
    for split, split_items in items.items():
        found = problems_in_split(split_items, processors)
        print(f"{split}: {len(split_items)} items, {len(found)} problems")
        problems += [f"{split}: {p}" for p in found]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


def cmd_import_digits(args: argparse.Namespace) -> int:
    from cman.data.importers import import_digits

    counts = import_digits(
        args.fsdd,
        args.out_dir,
        test_speakers=tuple(csv_list(args.test_speakers)),
        val_speakers=tuple(csv_list(args.val_speakers)),
        seed=args.seed,
    )
    print(f"digits dataset written to {args.out_dir}: {counts}")
    return 0


def cmd_import_coco(args: argparse.Namespace) -> int:
    from cman.data.importers import import_coco

    counts = import_coco(args.coco_dir, args.out_dir, seed=args.seed)
    print(f"COCO dataset written to {args.out_dir}: {counts} (spoken captions are synthetic, espeak-ng)")
    return 0


def _importing(name: str, run: Callable[[], dict[str, int]], out_dir: str) -> int:
    """Run an importer: on ImportProblems every problem is printed on stdout and one error line on stderr."""
    from cman.data.importing import ImportProblems

    try:
        counts = run()
    except ImportProblems as err:
        for problem in err.problems:
            print(problem)
        print(
            f"cman data {name}: error: {len(err.problems)} problem(s), listed above; nothing was written to {out_dir}",
            file=sys.stderr,
        )
        return 1
    print(f"dataset written to {out_dir}: {counts}")
    return 0


def cmd_import_flickr8k_audio(args: argparse.Namespace) -> int:
    from cman.data.flickr8k import import_flickr8k_audio

    def run() -> dict[str, int]:
        return import_flickr8k_audio(
            args.out_dir,
            images=args.images,
            captions=args.captions,
            audio=args.audio,
            wav2capt=args.wav2capt,
            splits=args.splits,
            wav2spk=args.wav2spk,
            skip_bad=args.skip_bad,
        )

    return _importing("import-flickr8k-audio", run, args.out_dir)


def cmd_import_manifest(args: argparse.Namespace) -> int:
    from cman.data.manifest import import_manifest

    def run() -> dict[str, int]:
        return import_manifest(
            args.out_dir,
            args.manifest,
            seed=args.seed,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            skip_bad=args.skip_bad,
        )

    return _importing("import-manifest", run, args.out_dir)
