"""Argument helpers shared by the `cman` subcommand modules (`cman.cli`, `cman.cli_data`): dash-style flags with
hidden underscore aliases, `--config` / `--set`, and loading the config they name."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def bundled_names() -> str:
    """The configs shipped with CMAN, by name (`demo, default, ...`)."""
    from cman.api import bundled_config

    return ", ".join(sorted(p.stem for p in bundled_config("default").parent.glob("*.yaml")))


def config_args(p: argparse.ArgumentParser, from_checkpoint: bool = False) -> None:
    p.add_argument(
        "--config",
        action="append",
        default=[],
        required=not from_checkpoint,
        help=f"YAML config file, or a bundled one by name: {bundled_names()}; repeatable: merged in order (later "
        "keys win, mappings merged key by key), --set last"
        + ("; default: the checkpoint's own config.yaml" if from_checkpoint else ""),
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set training.epochs=3 (repeatable)",
    )


def flag(p: argparse.ArgumentParser, name: str, **kwargs: Any) -> argparse.Action:
    """A dash-style option; its underscore spelling (`--output_dir`, earlier releases) is accepted but hidden."""
    action = p.add_argument(name, **kwargs)
    if "_" not in name and "-" in name[2:]:
        alias = {k: v for k, v in kwargs.items() if k in ("action", "type", "choices", "nargs", "metavar")}
        p.add_argument(
            "--" + name[2:].replace("-", "_"),
            dest=action.dest,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
            **alias,
        )
    return action


def load_args_config(args: argparse.Namespace, extra: dict[str, Any] | None = None, checkpoint: Path | None = None):
    """`--config` (merged in order) with `--set` and `extra` applied; without one, `checkpoint`'s own config.yaml."""
    from cman.config import load_config, parse_override

    overrides: dict[str, Any] = dict(parse_override(item) for item in args.overrides)
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    names = [args.config] if isinstance(args.config, str) else list(args.config or [])
    if not names and checkpoint is not None:
        return load_config(Path(checkpoint) / "config.yaml", overrides)
    return merged_config(names, overrides)


def merged_config(names: list[str], overrides: list[str] | dict[str, Any] | None = None):
    """The config files (or bundled names) `names` merged in order, then `overrides`; default: the bundled
    default.yaml (`cman.config.load_configs`)."""
    from cman.config import load_configs

    return load_configs([config_path(name) for name in names or ["default"]], overrides)


def config_path(name: str) -> str | Path:
    """A config file, or the name of a bundled one (`--config demo`) when no such file exists."""
    if Path(name).exists() or "/" in name:
        return name
    from cman.api import bundled_config

    try:
        return bundled_config(name)
    except FileNotFoundError:
        return name  # load_config names the missing file


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
