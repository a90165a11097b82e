"""`cman config show` (the resolved config, defaults included) and `cman config schema` (its JSON schema)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from cman.cli_args import config_path


def config_commands(sub: Any) -> None:
    p = sub.add_parser("config", help="print the resolved config (show) or its JSON schema (schema)")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    s = csub.add_parser(
        "show",
        help="the resolved config as YAML, every default included: what `cman train --config` would run",
        description="Several --config files are merged in order (later keys win, mappings merged key by key); "
        "--set overrides are applied last. The output loads back unchanged: "
        "cman train --config <(cman config show --config demo --set training.epochs=3)",
    )
    s.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML config file or bundled name (repeatable, merged in order); default: the bundled default.yaml",
    )
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    s.set_defaults(func=cmd_show)
    s = csub.add_parser("schema", help="the config's JSON schema (every key, type, default and limit)")
    s.set_defaults(func=cmd_schema)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def merged_config(names: list[str], overrides: list[str]):
    """The config of `names` merged in order (each file's relative model paths resolved against it), then `--set`."""
    from cman.config import ConfigError, apply_overrides, from_dict, resolve_model_paths

    data: dict[str, Any] = {}
    for name in names or ["default"]:
        path = Path(config_path(name))
        if not path.exists():
            raise ConfigError(f"config file {path} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = merge(data, resolve_model_paths(loaded, path))
    if overrides:
        data = apply_overrides(data, overrides)
    return from_dict(data)


def cmd_show(args: argparse.Namespace) -> int:
    print(merged_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from cman.config import CMANConfig

    print(json.dumps(CMANConfig.model_json_schema(), indent=2))
    return 0
