#!/usr/bin/env bash
# One-call GPU check: blockft_jax vs PyTorch (torchvision) step-level training throughput and MFU,
# MobileNetV2 and ResNet50V2 at 224 px, batch 256, bfloat16 (scripts/gpu_check.py's defaults),
# rows 'top' (top block + head; also a cohort of 8 runs in one vmapped step) and 'all' (full
# fine-tuning). Run from the repository root:
#
#   bash scripts/gpu_check.sh [extra gpu_check.py options, e.g. --steps 30]
#
# The rows share a time budget (GPU_CHECK_BUDGET_S, default 420 s; each row gets the budget
# left divided by the rows left, and a `timeout` a little above it), so the whole run stays under
# 8 minutes. Output goes to stdout and to $OUT/gpu_check.txt when $OUT is set. Needs python with
# jax (CUDA) and torch+torchvision; flax, optax (and ml_collections, optional) for blockft_jax:
# when missing here, they are looked for in build/gpu_deps (a `pip install --target` folder the
# caller may carry along); without them only the torch rows run, and it says so.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
ROWS=${GPU_CHECK_ROWS:-"mobilenet_v2:top resnet50_v2:top mobilenet_v2:all resnet50_v2:all"}
LOG=${OUT:+$OUT/gpu_check.txt}
LOG=${LOG:-/tmp/gpu_check.txt}
ROWS_LOG=$(mktemp /tmp/gpu_check_rows.XXXXXX)
START=$(date +%s)
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
TEE_PID=$!

echo "=== gpu_check.sh $(date -u +%FT%TZ) in $ROOT (budget ${BUDGET} s for the rows)"
echo "=== git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git status --porcelain 2>/dev/null | grep -q . && echo ' (dirty working tree)')"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi || true
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
else
  echo "nvidia-smi: not present"
fi

export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ -d "$ROOT/build/gpu_deps" ]; then  # appended: the machine's own packages come first
  export PYTHONPATH=$PYTHONPATH:$ROOT/build/gpu_deps
  echo "=== build/gpu_deps found: appended to PYTHONPATH (used only for what the machine lacks)"
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

echo "=== python: $PY"
timeout 120 "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("numpy", "jax", "jaxlib", "flax", "optax", "ml_collections", "torch", "torchvision"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} ({m.__file__})")
    except Exception as e:
        print(f"{name}: MISSING ({type(e).__name__}: {e})")
try:
    import jax
    print("jax backend", jax.default_backend(), "devices", jax.devices())
except Exception as e:
    print(f"jax devices: FAILED ({type(e).__name__}: {e})")
try:
    import torch
    n = torch.cuda.device_count()
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available(), "devices",
          [torch.cuda.get_device_name(i) for i in range(n)])
except Exception as e:
    print(f"torch devices: FAILED ({type(e).__name__}: {e})")
EOF

FRAMEWORKS=${GPU_CHECK_FRAMEWORKS:-}  # set it to skip the checks below (e.g. --python-torch)
if [ -n "$FRAMEWORKS" ]; then
  :
elif ! timeout 120 "$PY" -c 'import flax, optax' 2>/dev/null; then
  echo "!!! flax/optax cannot be imported with $PY: blockft_jax rows CANNOT run here (no network"
  echo "!!! to install them). Carry a 'pip install --target build/gpu_deps flax optax ...' folder."
  FRAMEWORKS=torch
elif ! timeout 120 "$PY" -c 'import blockft_jax.train' 2>/dev/null; then
  FRAMEWORKS=blockft_jax,blockft_jax_cohort,torch
  echo "=== import blockft_jax failed with PYTHONPATH=$PYTHONPATH; trying pip install --no-deps -e ."
  timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" || true
  timeout 120 "$PY" -c 'import blockft_jax.train' || { echo "!!! blockft_jax cannot be imported"; FRAMEWORKS=torch; }
else
  FRAMEWORKS=blockft_jax,blockft_jax_cohort,torch
fi
if [ -z "${GPU_CHECK_FRAMEWORKS:-}" ] && ! timeout 120 "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  echo "!!! torch/torchvision cannot be imported with $PY: torch rows cannot run"
  [ "$FRAMEWORKS" = torch ] && { echo "!!! nothing can run"; exit 1; }
  FRAMEWORKS=blockft_jax,blockft_jax_cohort
fi
echo "=== frameworks: $FRAMEWORKS; setup took $(( $(date +%s) - START )) s"

# On a GPU machine, insist on it: a JAX without a working CUDA plugin would otherwise fall back
# to the CPU silently (and take the whole budget). Extra options come after, so --device wins.
DEVICE=auto
command -v nvidia-smi >/dev/null && DEVICE=cuda
echo "=== device: $DEVICE; extra options: $*"

ROW_START=$(date +%s)
DEADLINE=$(( ROW_START + BUDGET ))
n_rows=$(echo $ROWS | wc -w)
i=0
for row in $ROWS; do
  model=${row%%:*}; trainable=${row#*:}
  now=$(date +%s)
  left=$(( DEADLINE - now )); rows_left=$(( n_rows - i )); i=$(( i + 1 ))
  limit=$(( left / rows_left ))
  if [ "$limit" -lt 20 ]; then
    echo "=== row $model $trainable: SKIPPED (budget used up)" | tee -a "$ROWS_LOG"
    continue
  fi
  echo "=== row $model $trainable: time limit $limit s ($(( now - START )) s elapsed)"
  timeout -k 5 $(( limit + 15 )) "$PY" scripts/gpu_check.py --models "$model" \
      --trainable "$trainable" --frameworks "$FRAMEWORKS" --time-limit "$limit" --device "$DEVICE" "$@" 2>&1 \
    | tee -a "$ROWS_LOG"
  echo "=== row $model $trainable done in $(( $(date +%s) - now )) s (exit ${PIPESTATUS[0]})"
done

echo
echo "=== summary ($(( $(date +%s) - START )) s in all)"
grep -E '^(gpu_check|ratio|cohort) ' "$ROWS_LOG" || echo "(no result lines)"
rm -f "$ROWS_LOG"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
