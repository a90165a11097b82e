"""`cman` command line. Every subcommand has --help; bad input is one clear line on stderr and a non-zero exit.

Ray, MLflow and Serve live outside the library (jobs/, tuning/, serve_app/) and are imported only by the
subcommands that need them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cman.cli_args import config_args as _config_args
from cman.cli_args import config_path as _config_path  # noqa: F401 - `cman.cli._config_path` (tests, earlier callers)
from cman.cli_args import flag as _flag
from cman.cli_args import load_args_config as _load
from cman.cli_config import config_commands as _config_commands
from cman.cli_data import data_commands as _data_commands

logger = logging.getLogger("cman")

EXAMPLES = """examples:
  cman demo-data data/demo                         # embedded offline dataset
  cman train --config configs/demo.yaml            # Ray Train (local Ray unless RAY_ADDRESS is set)
  cman eval --config configs/demo.yaml --checkpoint outputs/demo/checkpoints/best
  cman quickstart                                  # demo data -> tune -> index -> serve, offline
  cman data import-manifest data/mine media/manifest.csv          # your own media into the dataset layout
  cman index --checkpoint outputs/demo/checkpoints/best --from-folder photos/ --out index/  # a folder, no metadata
"""


STORAGE_HELP = (
    "a folder, or a storage URI (s3://bucket/path, gs://..., file:///abs/path, any pyarrow filesystem) for Ray's "
    "results and checkpoints on clusters without a shared disk"
)
LOCAL_DIR_HELP = (
    "with a storage URI --output-dir: the local folder for everything else (MLflow store, reports, exported "
    "checkpoints); default ./cman-runs/<bucket>/<path>"
)


def _storage_args(p: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """--output-dir (a folder or a storage URI) and --local-dir."""
    _flag(p, "--output-dir", default=default, help=f"{what}: {STORAGE_HELP}")
    _flag(p, "--local-dir", help=LOCAL_DIR_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cman",
        description="Cross-modal retrieval across text, speech and images.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"cman {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _data_commands(sub)
    _training_commands(sub)
    _serving_commands(sub)
    _config_commands(sub)
    return parser


def _training_commands(sub: Any) -> None:
    """train, eval, tune."""
    p = sub.add_parser("train", help="train a model (Ray Train; --in-process for a plain loop)")
    _config_args(p)
    _storage_args(p, None, "where checkpoints, metrics and the MLflow store go (default: the config's output_dir)")
    _flag(p, "--batch-size", type=int, help="per-worker training batch size (training.batch_size)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--debug", action="store_true", help="tiny run: 2 epochs on 64 items per split")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    _flag(p, "--in-process", action="store_true", help="train in this process without Ray")
    _flag(p, "--no-resume", action="store_true", help="start over even if OUTPUT_DIR holds a run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="six-direction retrieval metrics of a checkpoint")
    _config_args(p, from_checkpoint=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test")
    _flag(
        p,
        "--output-dir",
        help="where eval_<split>.json goes (default: the config's output_dir; for a storage URI its local folder "
        "./cman-runs/<bucket>/<path>)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export", help="copy a checkpoint with its frozen pretrained bases inside (loads without the hub or its cache)"
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (e.g. outputs/tune/best)")
    _flag(p, "--out", required=True, help="new directory for the self-contained copy (must not exist)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("tune", help="Ray Tune + Optuna sweep over LoRA rank/alpha, margin and learning rate")
    _config_args(p)
    _flag(p, "--num-samples", type=int, help="number of trials (tune.num_samples)")
    _flag(p, "--max-concurrent", type=int, help="trials running at once (tune.max_concurrent)")
    _storage_args(p, None, "sweep directory (default: the config's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in OUTPUT_DIR")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=cmd_tune)


def _serving_commands(sub: Any) -> None:
    """index, serve, quickstart."""
    p = sub.add_parser("index", help="build the gallery index of a dataset split, or of a folder of media")
    _config_args(p, from_checkpoint=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default="test", help="the dataset split to index (default test)")
    _flag(
        p,
        "--from-folder",
        metavar="DIR",
        help="index the images, audio and .txt files under DIR instead (found recursively, paired by shared stem, "
        "id = path without extension; no metadata needed)",
    )
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--in-process", action="store_true", help="embed in this process without Ray Data")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("serve", help="serve HTTP search (Ray Serve) over a checkpoint and an index")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint", help="checkpoint directory (default: the quickstart output, else MLflow's cman@champion)"
    )
    source.add_argument(
        "--model",
        metavar="URI",
        help="an MLflow model (models:/cman@champion, runs:/<run_id>/model; store: MLFLOW_TRACKING_URI) or a directory",
    )
    p.add_argument("--index", help="index directory (default: the quickstart index)")
    p.add_argument("--config", help="config whose `serve:` section sets batching/limits (default: checkpoint's)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="serve.KEY=VALUE",
        help="override a `serve:` key, e.g. --set serve.encoder_replicas=2 (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quickstart", help="the main job, offline: demo-data -> tune -> index -> serve")
    _storage_args(p, "outputs/quickstart", "everything goes here (default outputs/quickstart)")
    _flag(p, "--num-samples", type=int, default=None, help="sweep trials (default 2)")
    _flag(p, "--no-serve", action="store_true", help="stop after the index (no HTTP service)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the bundled demo config, e.g. --set training.epochs=2 (repeatable)",
    )
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_quickstart)


# ---- commands ------------------------------------------------------------------------------------------------------
def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {"training.batch_size": args.batch_size, "training.epochs": args.epochs}
    if args.debug:
        extra.update({"training.debug": True, "data.max_items": 64})
        extra["training.epochs"] = args.epochs or 2
    if args.output_dir:
        extra["output_dir"] = args.output_dir
    return extra


def cmd_train(args: argparse.Namespace) -> int:
    from cman.metrics import format_table
    from jobs.storage import locate

    config = _load(args, _train_overrides(args))
    where = locate(config.output_dir, args.local_dir)  # a bad URI or flag: one clear error before anything starts
    if args.in_process:
        if where.remote:
            raise ValueError(
                f"--in-process trains without Ray, so there are no Ray results to store at {where.output}: "
                "give --output-dir a local folder"
            )
        from cman.training import fit

        report = fit(config, where.local_dir, resume=not args.no_resume)
    else:
        from jobs.train import run_training

        resume = not args.no_resume
        local_dir = where.local_dir if where.remote else None  # a plain --output-dir holds everything
        report = run_training(config, where.output, address=args.address, resume=resume, local_dir=local_dir)
    print(format_table(report["test"]))
    print(f"checkpoints: {where.local_dir / 'checkpoints'}  metrics: {report['eval_path']}")
    if where.remote:
        print(f"Ray results and checkpoints: {where.describe('ray_results')}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cman.api import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)  # a wrong path is one line before torch is imported
    config = _load(args, checkpoint=checkpoint)

    from cman.metrics import format_table
    from cman.training import evaluate_checkpoint, write_eval

    result = evaluate_checkpoint(checkpoint, args.split, root=config.data.root, progress=True)
    out = args.output_dir or config.output_dir
    if "://" in str(out):  # a storage URI: eval_<split>.json goes to its local folder (jobs.storage)
        from jobs.storage import default_local_dir

        out = default_local_dir(str(out))
    path = write_eval(Path(out), args.split, result)
    print(format_table(result))
    print(f"written to {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cman.models.cman import make_self_contained

    out = Path(args.out)
    if out.exists():
        raise ValueError(f"--out {out} already exists: choose a new directory (nothing was written)")
    path = make_self_contained(args.checkpoint, out)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"self-contained checkpoint written to {path} ({size / 2**20:.1f} MiB, bases included)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from tuning.sweep import run_sweep

    extra = {
        "tune.num_samples": args.num_samples,
        "tune.max_concurrent": args.max_concurrent,
        "output_dir": args.output_dir,
    }
    config = _load(args, extra)
    run_sweep(config, config.output_dir, resume=args.resume, address=args.address, local_dir=args.local_dir)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from cman.api import resolve_checkpoint
    from jobs.build_index import build_index, build_index_ray

    config = _load(args, checkpoint=resolve_checkpoint(args.checkpoint))
    common = {"root": config.data.root, "kind": config.serve.index_kind, "serve": config.serve}
    if args.from_folder is not None:
        if not Path(args.from_folder).is_dir():  # one line before torch or Ray start
            raise ValueError(f"--from-folder {args.from_folder} is not a directory")
        common["folder"] = args.from_folder
    if args.in_process:
        summary = build_index(args.checkpoint, args.split, args.out, **common)
    else:
        summary = build_index_ray(args.checkpoint, args.split, args.out, address=args.address, **common)
    print(f"index written to {args.out}: {summary}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serve_app.run import serve_forever

    checkpoint = args.checkpoint
    if args.model:
        from cman.api import resolve_checkpoint

        checkpoint = resolve_checkpoint(args.model)
        print(f"serving {args.model} (checkpoint {checkpoint})")
    settings = serve_overrides(args.overrides)
    serve_forever(checkpoint, args.index, args.config, args.host, args.port, settings)
    return 0


def serve_overrides(items: list[str]) -> dict[str, Any]:
    """`--set serve.a.b=v` items as a nested `serve:` mapping (values parsed as YAML); other sections are an error."""
    import yaml
    from pydantic import ValidationError

    from cman.config import ConfigError, ServeConfig, parse_override

    settings: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        section, _, rest = key.partition(".")
        if section != "serve" or not rest:
            raise ConfigError(f"--set {item!r}: `cman serve` takes serve.* keys only, e.g. serve.encoder_replicas=2")
        *parents, leaf = rest.split(".")
        node = settings
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    try:
        ServeConfig.model_validate(settings)  # a wrong key or value fails here, before Ray starts
    except ValidationError as err:
        first = err.errors()[0]
        key = "serve." + ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"--set {key}: {first['msg']}") from None
    return settings


def cmd_quickstart(args: argparse.Namespace) -> int:
    from cman.config import parse_override
    from jobs.quickstart import quickstart

    overrides = dict(parse_override(item) for item in args.overrides)
    quickstart(
        args.output_dir,
        local_dir=args.local_dir,
        num_samples=args.num_samples,
        serve=not args.no_serve,
        port=args.port,
        overrides=overrides,
    )
    return 0


# ---- entry point ---------------------------------------------------------------------------------------------------
def _version() -> str:
    from cman import __version__

    return __version__


def _quiet_libraries(verbose: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        from jobs.cluster import quiet_libraries

        quiet_libraries()


# the extra that installs what each command needs, and (for other commands) the extra of each optional module
COMMAND_EXTRAS = {"train": "train", "eval": "train", "tune": "tune", "serve": "serve", "index": "serve"}
COMMAND_EXTRAS.update({"quickstart": "demo", "demo-data": "demo"})
MODULE_EXTRAS = {
    "ray": "train",
    "mlflow": "mlflow",
    "matplotlib": "mlflow",
    "optuna": "tune",
    "fastapi": "serve",
    "starlette": "serve",
    "httpx": "serve",
    "psycopg": "serve",
    "faiss": "index",
    "sqlalchemy": "index",
    "espeakng_loader": "demo",
    "sklearn": "demo",
}


# what the core install has (and this project's own packages): missing, they are a broken install, not an extra
CORE_MODULES = {"torch", "transformers", "peft", "tokenizers", "safetensors", "numpy", "pydantic", "yaml"}
CORE_MODULES |= {"soundfile", "soxr", "PIL", "tqdm", "cman", "jobs", "tuning", "serve_app"}


def missing_extra(command: str, module: str | None) -> str | None:
    """'cman tune needs optuna: pip install 'cman[tune]'' for an optional module that is not installed, else None."""
    top = (module or "").split(".")[0]
    if not top or top in CORE_MODULES:
        return None
    extra = COMMAND_EXTRAS.get(command) or MODULE_EXTRAS.get(top)
    if extra is None:
        return None
    return f"cman {command} needs {top!r}, which is not installed: pip install 'cman[{extra}]' (or 'cman[all]')"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    _quiet_libraries(args.verbose)
    os.environ["CMAN_VERBOSE"] = "1" if args.verbose else os.environ.get("CMAN_VERBOSE", "")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("cman: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        if args.verbose or missing_extra(args.command, err.name) is None:
            raise
        print(f"cman {args.command}: error: {missing_extra(args.command, err.name)}", file=sys.stderr)
        return 1
    except Exception as err:  # one clear line, no traceback (unless -v)
        if args.verbose:
            raise
        name = type(err).__name__
        prefix = "" if name in ("ValueError", "ConfigError", "DataError") else f"{name}: "
        print(f"cman {args.command}: error: {prefix}{err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
