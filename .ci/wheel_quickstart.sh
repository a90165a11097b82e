#!/usr/bin/env bash
# CI step: `pip install .` (a wheel, not editable) into a clean venv runs `cman quickstart --no-serve` on a tiny run.
# To skip a multi-minute dependency install, the new venv sees the dependencies of .venv through a .pth file (plain
# path lines: .venv's own .pth files, including its editable cman, are NOT processed) and the wheel goes in with
# --no-deps. Everything runs from a directory outside the repository, so the source tree cannot be imported.
# Usage: .ci/wheel_quickstart.sh [PYTHON_OF_A_VENV_WITH_THE_DEPENDENCIES]   (default .venv/bin/python)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$REPO/.venv/bin/python}"
WORK="$(mktemp -d /tmp/cman-wheel.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$REPO"
"$PY" -m venv "$WORK/venv"
deps="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
own="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$deps" > "$own/cman_ci_deps.pth"
"$WORK/venv/bin/python" -m pip install -q --no-deps "$WORK"/dist/cman-*.whl

cd "$WORK"
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 PYTHONPATH=
"$WORK/venv/bin/python" - "$REPO" <<'PY'
import sys
from pathlib import Path

import cman

repo = Path(sys.argv[1]).resolve()
where = Path(cman.__file__).resolve()
print(f"cman {cman.__version__} imported from {where}")
assert repo not in where.parents, f"cman was imported from the source tree {where}"
assert not {"ray", "mlflow", "fastapi", "torch"} & set(sys.modules), "import cman loaded heavy modules"
from cman import CMAN  # noqa: E402,F401
from cman.api import bundled_config  # noqa: E402

assert "ray" not in sys.modules and "mlflow" not in sys.modules
config = bundled_config("demo")
assert repo not in config.resolve().parents, config
print(f"bundled config: {config}")
PY
"$WORK/venv/bin/cman" --version
TINY=(--set training.epochs=2 --set tune.grace_period=1 --set data.max_items=24 --set model.fusion.layers=1)
for m in text audio image; do TINY+=(--set "model.$m.init.num_hidden_layers=1"); done
"$WORK/venv/bin/cman" quickstart --no-serve --num-samples 1 --output-dir "$WORK/qs" "${TINY[@]}" 2>&1 | tee "$WORK/qs.log"
test -f "$WORK/qs/best/metadata.json" && test -f "$WORK/qs/index/index_meta.json"
# the console stays free of library noise a user cannot act on (issue 10); `cman -v` brings it back
NOISE='core_worker\.cc|PreemptionWatcher|PlacementGroupCleaner|Writing model shards|Checkpoint successfully created|'
NOISE+='Reporting training result|performance bottleneck|is_gradient_checkpointing|project\.license|embed: '
if grep -E "$NOISE" "$WORK/qs.log"; then echo "quickstart console has the library noise above" >&2; exit 1; fi
echo "wheel quickstart OK in $(( $(date +%s) - start )) s"
