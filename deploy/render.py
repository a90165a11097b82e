"""Write the RayService's `serveConfigV2` (deploy/rayservice.yaml) from serve_app/config.yaml plus the Kubernetes
overrides below, so the two cannot drift apart: tests/test_deploy.py fails when the committed manifest differs from
what this renders.

    python deploy/render.py            # rewrite the serveConfigV2 block of deploy/rayservice.yaml
    python deploy/render.py --check    # exit 1 if it is out of date

Only the `serveConfigV2: |` block is rewritten; the rest of the manifest is edited by hand.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve_app" / "config.yaml"
MANIFEST = REPO / "deploy" / "rayservice.yaml"
BLOCK_KEY = "serveConfigV2"

# Where the RayJob (deploy/rayjob.yaml) leaves what the service loads, on the volume both mount at /mnt/cman.
CHECKPOINT = "/mnt/cman/sweeps/s1/best"
INDEX_DIR = "/mnt/cman/index"
GALLERY_STORE = "postgresql://cman@cman-postgres:5432/gallery"


@dataclass(frozen=True)
class Override:
    """One deliberate difference from serve_app/config.yaml. `path` walks dicts by key and lists of named entries
    (applications, deployments) by `name`; `adds` marks a key config.yaml does not have (every other path must
    exist there, so renaming a key in config.yaml fails the test instead of leaving a stale override)."""

    path: tuple[str, ...]
    value: Any
    why: str
    adds: bool = False


OVERRIDES = (
    Override(
        ("http_options", "host"),
        "0.0.0.0",
        "the proxy listens on the pod's address, where KubeRay's Service and readiness probe reach it",
    ),
    Override(
        ("applications", "cman", "args", "host"),
        "0.0.0.0",
        "kept equal to http_options.host; POST /items then needs the API key (CMAN_API_KEY, from a Secret)",
    ),
    Override(("applications", "cman", "args", "checkpoint"), CHECKPOINT, "the sweep's best checkpoint (rayjob.yaml)"),
    Override(("applications", "cman", "args", "index_dir"), INDEX_DIR, "the index rayjob.yaml builds"),
    Override(
        ("applications", "cman", "args", "serve", "gallery_store"),
        GALLERY_STORE,
        "one gallery for Retrievers on several pods (password: PGPASSWORD, from a Secret)",
        adds=True,
    ),
    Override(
        ("applications", "cman", "args", "serve", "encoder_replicas"),
        2,
        "two of each encoder, spread over the worker pods (Serve's default spread scheduling)",
        adds=True,
    ),
    Override(("applications", "cman", "args", "serve", "retriever_replicas"), 2, "two Retrievers", adds=True),
    Override(
        ("applications", "cman", "deployments"),
        [{"name": "Retriever", "max_replicas_per_node": 1}],
        "never both Retrievers on one pod: losing a pod leaves one serving",
        adds=True,
    ),
)


def _child(node: Any, key: str, create: bool) -> Any:
    if isinstance(node, list):
        for entry in node:
            if isinstance(entry, dict) and entry.get("name") == key:
                return entry
        raise KeyError(f"no entry named {key!r}")
    if key not in node:
        if not create:
            raise KeyError(f"no key {key!r}")
        node[key] = {}
    return node[key]


def apply_overrides(config: dict, overrides: tuple[Override, ...] = OVERRIDES) -> dict:
    """A copy of `config` with `overrides` applied; KeyError if a replacing override's path is missing."""
    out = copy.deepcopy(config)
    for override in overrides:
        *parents, last = override.path
        node = out
        try:
            for key in parents:
                node = _child(node, key, create=override.adds)
            if not override.adds and last not in node:
                raise KeyError(f"no key {last!r}")
        except KeyError as err:
            where = ".".join(override.path)
            raise KeyError(f"override {where}: {err.args[0]} in {SERVE_CONFIG.relative_to(REPO)}") from None
        node[last] = copy.deepcopy(override.value)
    return out


def serve_config() -> dict:
    """serve_app/config.yaml with the Kubernetes overrides: what serveConfigV2 holds."""
    return apply_overrides(yaml.safe_load(SERVE_CONFIG.read_text()))


def render_block() -> str:
    """The serveConfigV2 text: a comment naming the source and each override, then the config as YAML."""
    lines = [
        "# Rendered by deploy/render.py from serve_app/config.yaml (whose comments explain the settings): edit",
        "# those, then run `python deploy/render.py`. The Kubernetes overrides:",
    ]
    for override in OVERRIDES:
        shown = "(list below)" if isinstance(override.value, list) else override.value
        lines += [f"#   {'.'.join(override.path)}: {shown}", f"#     {override.why}"]
    body = yaml.safe_dump(serve_config(), sort_keys=False, default_flow_style=False, width=120)
    return "\n".join(lines) + "\n" + body


def replace_block(manifest: str, block: str) -> str:
    """`manifest` with the literal block under `serveConfigV2: |` replaced by `block` (indented two more spaces)."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(rf"^\s*{BLOCK_KEY}: \|\s*$", line)]
    if len(starts) != 1:
        raise ValueError(f"expected one `{BLOCK_KEY}: |` line in the manifest, found {len(starts)}")
    start = starts[0]
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next key stay outside
        end -= 1
    pad = " " * (indent + 2)
    body = [(pad + line if line.strip() else "\n") for line in block.splitlines(keepends=True)]
    return "".join(lines[: start + 1] + body + lines[end:])


def render(manifest: str) -> str:
    return replace_block(manifest, render_block())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render deploy/rayservice.yaml's serveConfigV2")
    parser.add_argument("--check", action="store_true", help="exit 1 if the manifest is out of date; write nothing")
    args = parser.parse_args(argv)
    current = MANIFEST.read_text()
    rendered = render(current)
    if args.check:
        if rendered != current:
            print(f"{MANIFEST}: serveConfigV2 is out of date; run python deploy/render.py", file=sys.stderr)
            return 1
        return 0
    if rendered != current:
        MANIFEST.write_text(rendered)
        print(f"updated {MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
