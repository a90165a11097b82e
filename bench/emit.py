"""Shared by the benchmark scripts: print a result as JSON and write it to bench/results/<name>.json (or --out)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def emit_json(result: dict[str, Any], name: str, out: str | Path | None = None) -> Path:
    """Print `result` (indented JSON) and write it to `out`, default `bench/results/<name>.json`."""
    text = json.dumps(result, indent=2)
    print(text)
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
