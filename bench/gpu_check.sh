#!/usr/bin/env bash
# One prepared GPU check (< 8 min): the `base` preset (RoBERTa-/AST-/ViT-base shapes, random init, frozen bases +
# LoRA, fusion 6x512) trained in bf16 for a fixed number of steps on one NVIDIA GPU; prints samples/s, MFU against
# the GPU's measured bf16 GEMM rate, and peak memory (torch.cuda.max_memory_allocated).
#
#   bash bench/gpu_check.sh                  # STEPS=20 BATCH=32 by default; results under $OUT or bench/results
#
# Packages missing on the GPU machine travel as wheels in .whl/ (see bench/README.md); they are installed from
# there when present, else the machine's own packages are used. cman runs from this checkout (PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${STEPS:-20}
BATCH=${BATCH:-32}
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PYEOF' || exit 1
import importlib, sys
missing = []
for name in ("torch", "transformers", "peft", "pydantic", "soundfile", "soxr", "yaml", "PIL", "tokenizers",
             "safetensors", "tqdm"):
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001
        missing.append(f"{name} ({err})")
if missing:
    sys.exit("gpu_check: missing packages, carry them as wheels in .whl/: " + ", ".join(missing))
try:
    import cman.models.cman  # noqa: F401  (fails on a transformers too old for cman, e.g. no ViTImageProcessorPil)
except ImportError as err:
    sys.exit(f"gpu_check: cman does not import ({err}); carry transformers>=5.24 (+ tokenizers, huggingface_hub)")
import torch, transformers
print(f"torch {torch.__version__}  transformers {transformers.__version__}  cuda {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible")
PYEOF

run() {  # name, timeout, extra args
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" bench/train_throughput.py --config configs/default.yaml --preset base --device cuda \
    --dtype bf16 --steps "$STEPS" --warmup 3 --batch-size "$BATCH" --loader-items 64 --synthetic \
    --out "$RESULTS/train_throughput_base_cuda_$name.json" "$@" > "$RESULTS/gpu_check_$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || { echo "gpu_check: run '$name' failed (rc $rc), log tail:"; tail -20 "$RESULTS/gpu_check_$name.log"; }
  return $rc
}

run eager 240
run compiled 200 --compile --fused-adamw   # torch.compile + fused AdamW; compile time is not in the timed steps

"$PY" - "$RESULTS" <<'PYEOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("train_throughput_base_cuda_*.json")):
    r = json.loads(path.read_text())
    print(f"{path.stem}: {r['device_name']}  batch {r['batch_size']}  {r['samples_per_s']:.1f} samples/s  "
          f"{r['achieved_flops_per_s'] / 1e12:.1f} TFLOP/s of {r['gemm']['flops_per_s'] / 1e12:.0f} "
          f"(bf16 GEMM {r['gemm']['size']}^3)  MFU {100 * r['mfu']:.1f} %  "
          f"peak memory {r['peak_memory_bytes'] / 2**30:.1f} GiB  "
          f"loader {r['loader']['uncached_samples_per_s']:.0f}/{r['loader']['cached_samples_per_s']:.0f} samples/s "
          f"(uncached/cached)  attention {r['attention']}")
PYEOF
