"""`cman config show` (the resolved config, defaults included) and `cman config schema` (its JSON schema)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cman.cli_args import merged_config


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


def cmd_show(args: argparse.Namespace) -> int:
    print(merged_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from cman.config import CMANConfig

    print(json.dumps(CMANConfig.model_json_schema(), indent=2))
    return 0
