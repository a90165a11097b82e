#!/usr/bin/env bash
# CI step: `pip install .` (a wheel, not editable) into a clean venv runs `cman quickstart --no-serve` on a tiny run.
# To skip a multi-minute dependency install, the new venv sees the dependencies of .venv through a .pth file (plain
# path lines: .venv's own .pth files, including its editable cman, are NOT processed) and the wheel goes in with
# --no-deps. Everything runs from a directory outside the repository, so the source tree cannot be imported.
# Usage: .ci/wheel_quickstart.sh [PYTHON_OF_A_VENV_WITH_THE_DEPENDENCIES]   (default .venv/bin/python)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$REPO/.venv/bin/python}"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute (not resolved: a venv's python is a link)
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

# the core install, as `pip install cman` gives it: no extras, the dependencies pinned by constraints.txt. It loads
# the checkpoint above and embeds; a command that needs an extra names it.
"$PY" -m venv "$WORK/core"
"$WORK/core/bin/python" -m pip install -q --upgrade pip
"$WORK/core/bin/python" -m pip install -q torch==2.13.0
"$WORK/core/bin/python" -m pip install -q -c "$REPO/constraints.txt" "$WORK"/dist/cman-*.whl
"$WORK/core/bin/python" - "$WORK/qs/best" <<'PY'
import importlib.util
import sys

absent = [m for m in ("ray", "mlflow", "faiss", "fastapi", "optuna", "matplotlib", "sklearn") if importlib.util.find_spec(m)]
assert not absent, f"the core install pulled optional packages: {absent}"
from cman import CMAN  # noqa: E402

model = CMAN.from_pretrained(sys.argv[1])
vector = model.embed(text="a small red circle on the left")
assert vector.shape[-1] == model.config.model.embedding_dim, vector.shape
print(f"core install: embedded with {sys.argv[1]} -> {vector.shape}")
PY
for spec in "tune --config $WORK/qs/best/config.yaml:tune" "serve --checkpoint $WORK/qs/best --index $WORK/qs/index:serve"; do
  args="${spec%:*}"; extra="${spec##*:}"
  if "$WORK/core/bin/cman" $args 2> "$WORK/err"; then echo "cman $args ran without its extra" >&2; exit 1; fi
  grep -q "pip install 'cman\[$extra\]'" "$WORK/err" || { cat "$WORK/err" >&2; echo "no [$extra] hint" >&2; exit 1; }
  echo "core install: cman ${args%% *} names the [$extra] extra"
done
echo "wheel quickstart OK in $(( $(date +%s) - start )) s"
