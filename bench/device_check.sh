#!/usr/bin/env bash
# The accelerator check, one command, about 5 minutes on one GPU:
#
#   bench/device_check.sh            # on the accelerator JAX finds (GPU/TPU)
#   bench/device_check.sh --cpu      # the same steps on the CPU, smaller sizes
#
# 1. parity: tests/test_parity.py (torch reference on the CPU, jaxtag on the device, 1e-5) and
#    tests/test_precision.py, with TensorFlow, TFDS, librosa and ml_collections made unimportable
#    (an accelerator machine may have none of them);
# 2. bench/bench_model.py: train float32 batch 16 and 256, bfloat16 batch 1024; inference float32
#    batch 16, bfloat16 batch 1024; FLOPs counted on the CPU backend, utilisation against the
#    device's peak; compile seconds first and cached;
# 3. bench/bench_loop.py: the real training loop (validation, a checkpoint) on the in-memory source.
#
# Logs go to $DEVICE_CHECK_OUT (default: a new temporary directory); a summary is printed at the
# end. Exit status: non-zero when any step failed. Python: $PYTHON, else python.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${DEVICE_CHECK_OUT:-$(mktemp -d -t jaxtag-device-check-XXXX)}
mkdir -p "$OUT"

if [ "${1:-}" = "--cpu" ]; then
    export JAX_PLATFORMS=cpu
    PARITY_SELECT=(-k "(released and legacy) or precision")
    # float32 batch 16 for both modes: their cold compiles are the compile check's first ones.
    CASES=(train:float32:4 train:float32:16 train:bfloat16:8 infer:float32:16 infer:bfloat16:16)
    BENCH_SECONDS=1
    BENCH_LIMIT=600
    LOOP_STEPS=100
elif [ $# -gt 0 ]; then
    echo "usage: bench/device_check.sh [--cpu]" >&2
    exit 2
else
    PARITY_SELECT=()
    CASES=(train:float32:16 train:float32:256 train:bfloat16:1024 infer:float32:16
        infer:bfloat16:1024)
    BENCH_SECONDS=3
    BENCH_LIMIT=420
    LOOP_STEPS=300
fi

status=0
: >"$OUT/summary.txt"
# step NAME TIMEOUT_S COMMAND...: runs COMMAND, shows and logs its output, records the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    local start=$SECONDS rc
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    local result="ok"
    if [ "$rc" -ne 0 ]; then
        result="FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", timed out after ${limit} s"))"
        status=1
    fi
    echo "$name: $result, $((SECONDS - start)) s" >>"$OUT/summary.txt"
}

step environment 60 "$PY" -c '
import platform, jax, flax, optax
print("python", platform.python_version(), "| jax", jax.__version__, "| flax", flax.__version__,
      "| optax", optax.__version__)
print("backend", jax.default_backend(), "| devices", jax.devices())
try:
    import torch
    print("torch", torch.__version__, "| cuda visible to torch:", torch.cuda.is_available())
except ImportError:
    print("torch not installed")
'

# The parity tests import nothing of TensorFlow, TFDS, librosa or ml_collections: made
# unimportable here so that a machine without them behaves the same as one with them.
step parity 240 "$PY" -c '
import sys
for name in ("tensorflow", "tensorflow_datasets", "librosa", "ml_collections"):
    sys.modules[name] = None
import pytest
sys.exit(pytest.main(["-q", "-s", "-p", "no:cacheprovider", *sys.argv[1:]]))
' tests/test_parity.py tests/test_precision.py "${PARITY_SELECT[@]}"

bench_args=(--no-torch --min-seconds "$BENCH_SECONDS" --warmup 2 --min-iters 3
    --json "$OUT/bench_model.json")
for case in "${CASES[@]}"; do bench_args+=(--case "$case"); done
step bench_model "$BENCH_LIMIT" "$PY" bench/bench_model.py "${bench_args[@]}"

if [ -f bench/bench_loop.py ]; then
    step bench_loop 240 "$PY" bench/bench_loop.py --model tiny --batch 16 --steps "$LOOP_STEPS"
else
    echo "note: bench/bench_loop.py is not in this tree; the training-loop step is skipped"
    echo "bench_loop: skipped (bench/bench_loop.py missing)" >>"$OUT/summary.txt"
fi

echo
echo "== summary (logs in $OUT)"
cat "$OUT/summary.txt"
grep -h "max abs diff" "$OUT/parity.log" 2>/dev/null | sed 's/^\.*//'
sed -n '/^mode /,/^compile seconds/p' "$OUT/bench_model.log" 2>/dev/null
exit $status
