#!/usr/bin/env bash
# Every GPU figure of the evaluation and speed issues, as one prepared script (see
# benchmarks/GPU_CHECKS.md for how to run it on a lent machine inside its 15 minutes).
#
#   OUT=/path/to/results benchmarks/gpu_checks.sh [STEP ...]
#
# STEP (default: env tests eval embed train):
#   env       GPU, driver and package versions                      -> env.txt
#   tests     the GPU == CPU evaluation tests and the loss tests on this stack, and
#             check_step_syncs.py: where a training step still waits for the GPU (in logs.tar.gz)
#   eval      bench_eval at Market-1501 and MSMT17 scale on the GPU  -> eval_market.json, eval_msmt.json
#   train     bench_train, the paper's recipe (ResNet50 CTL 256x128 P=16 K=4), plain vs fast
#                                                                    -> train.json
#   embed     bench_embed: create_embeddings.py from JPEG files, bf16 -> embed.json
#   realdata  train_scripts/cuhk03p1/real_data_check.sh (the four runs) -> realdata.md
# After every step: summary.txt (each step's status and time) and logs.tar.gz (every step's full
# log) are refreshed under $OUT, so a call cut off by its own time limit still brings them back; at
# the end projection.txt (the 120-epoch recipe projected from the train/embed/eval figures).
#
# Each step runs under its own limit (LIMIT_<STEP> seconds, defaults below), capped so that all steps
# end within BUDGET seconds of the start (default 500: leave the call's timeout_s some room); a step
# with under 30 s left is skipped. A step that fails or runs out of time is reported and the others
# still run. SMOKE=1 runs every step at toy sizes on the CPU, to check the plumbing on a machine
# without a GPU (its figures mean nothing).
# Environment: PYTHON (default python3), DATA_ROOT (cuhk03p1, default data/cuhk03p1, else
# ../shared/data/cuhk03p1), EPOCHS (realdata, default 30), MNV2_WEIGHTS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
WORK=$(mktemp -d /tmp/gpu_checks.XXXXXX)
trap 'rm -rf "$WORK"' EXIT  # runs, checkpoints and data: gigabytes; what matters is copied to $OUT
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-500}
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(env tests eval embed train)
if [ -z "${DATA_ROOT:-}" ]; then
    DATA_ROOT=data/cuhk03p1
    [ -d "$DATA_ROOT" ] || DATA_ROOT=../shared/data/cuhk03p1
fi
if [ "$SMOKE" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi

step_env() {
    { date -u; nvidia-smi 2>&1 || echo "(no nvidia-smi)"; nproc; free -g | head -2; df -h /dev/shm /tmp
      "$PYTHON" - <<'PY'
import sys, numpy, torch, torchvision, pytorch_lightning, PIL
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| lightning", pytorch_lightning.__version__, "| numpy", numpy.__version__, "| pillow", PIL.__version__)
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import yacs  # noqa: F401
    print("yacs: ok")
except ImportError as err:
    print("yacs MISSING:", err)
PY
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

step_tests() {
    # The GPU-vs-CPU evaluation tests are skipped without a GPU; the rest checks this torch stack.
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_eval_reid.py tests/test_losses.py \
        tests/test_reranking.py -rs
    local status=$?
    # Where a training step still makes the host wait for the GPU (a report, not a pass/fail).
    local plumbing=""; [ "$SMOKE" = 1 ] && plumbing="--cpu-plumbing"
    "$PYTHON" benchmarks/check_step_syncs.py $plumbing --out "$WORK/syncs.json" || echo "check_step_syncs failed"
    "$PYTHON" benchmarks/check_step_syncs.py $plumbing --resampling off --out "$WORK/syncs_mocks.json" \
        || echo "check_step_syncs --resampling off failed"
    return $status
}

step_eval() {
    if [ "$SMOKE" = 1 ]; then
        "$PYTHON" benchmarks/bench_eval.py --scale small --device cpu --out "$OUT/eval_market.json"
        return
    fi
    "$PYTHON" benchmarks/bench_eval.py --scale market --device cuda --repeats 3 --out "$OUT/eval_market.json" &&
    "$PYTHON" benchmarks/bench_eval.py --scale msmt --device cuda --out "$OUT/eval_msmt.json"
}

step_train() {
    if [ "$SMOKE" = 1 ]; then
        "$PYTHON" benchmarks/bench_train.py --device cpu --model resnet18 --size 64 32 --p 4 --k 4 \
            --steps 2 --warmup 1 --workers 1 --out "$OUT/train.json"
        return
    fi
    "$PYTHON" benchmarks/bench_train.py --device cuda --model resnet50 --size 256 128 --p 16 --k 4 \
        --steps 50 --warmup 10 --compile auto --out "$OUT/train.json"
}

step_embed() {
    if [ "$SMOKE" = 1 ]; then
        "$PYTHON" benchmarks/bench_embed.py --device cpu --images 40 --models resnet18 --size 64 32 \
            --out "$OUT/embed.json"
        return
    fi
    "$PYTHON" benchmarks/bench_embed.py --device cuda --images 40000 --models resnet50 --batch 512 \
        --out "$OUT/embed.json"
}

step_realdata() {
    local root="$WORK/cuhk03p1_check" epochs=${EPOCHS:-30} extra=""
    if [ "$SMOKE" = 1 ]; then
        epochs=1
        extra="SOLVER.MAX_ITERS_PER_EPOCH 2 INPUT.SIZE_TRAIN [64,32] INPUT.SIZE_TEST [64,32] DATASETS.VERIFY_IMAGES False"
    else
        extra="MODEL.COMPILE off"  # minutes-long runs: compiling four times would cost more than it saves
    fi
    # One checkpoint at the end, not one per epoch (about 300 MB each for ResNet50).
    extra="$extra SOLVER.CHECKPOINT_PERIOD $epochs"
    DATA_ROOT="$DATA_ROOT" EPOCHS="$epochs" OUTPUT_ROOT="$root" PYTHON="$PYTHON" EXTRA="$extra" \
        bash train_scripts/cuhk03p1/real_data_check.sh
}

finish_step() {  # after every step, even one cut short: whatever exists so far goes to $OUT
    if [ "$1" = realdata ] && [ -d "$WORK/cuhk03p1_check" ]; then
        "$PYTHON" benchmarks/real_data_table.py "$WORK/cuhk03p1_check" --out "$OUT/realdata.md" || true
    fi
    cp "$WORK/summary.txt" "$OUT/summary.txt"
    tar -C "$WORK" -czf "$OUT/logs.tar.gz" --exclude='*.ckpt' --exclude='*/checkpoints' . 2>/dev/null || true
}

declare -A LIMIT=([env]=60 [tests]=120 [eval]=150 [embed]=120 [train]=330 [realdata]=480)
: > "$WORK/summary.txt"
for step in "${STEPS[@]}"; do
    if ! declare -F "step_$step" >/dev/null; then
        echo "unknown step '$step' (env tests eval train embed realdata)" | tee -a "$WORK/summary.txt"
        continue
    fi
    var="LIMIT_${step^^}"
    limit=${!var:-${LIMIT[$step]}}
    left=$(( BUDGET - SECONDS - 15 ))
    if [ "$left" -lt 30 ]; then
        echo "$step: SKIPPED (only $(( BUDGET - SECONDS )) s of the ${BUDGET} s budget left)" | tee -a "$WORK/summary.txt"
        finish_step "$step"
        continue
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "=== $step (limit ${limit} s)"
    start=$SECONDS
    # Each step in a subshell under its own limit; its whole log is kept.
    ( export -f "step_$step"; export OUT PYTHON SMOKE WORK DATA_ROOT DEVICE
      timeout --kill-after=10 "$limit" bash -c "step_$step" ) > "$WORK/$step.log" 2>&1
    status=$?
    tail -n 25 "$WORK/$step.log"
    case $status in
        0) word=ok ;;
        124|137) word="TIMED OUT after ${limit} s" ;;
        *) word="FAILED (exit $status)" ;;
    esac
    echo "$step: $word in $(( SECONDS - start )) s" | tee -a "$WORK/summary.txt"
    finish_step "$step"
done

if [ -f "$OUT/train.json" ]; then
    "$PYTHON" benchmarks/recipe_projection.py --train "$OUT/train.json" --embed "$OUT/embed.json" \
        --eval "$OUT/eval_market.json" > "$OUT/projection.txt" 2>&1 || true
    cat "$OUT/projection.txt"
fi
echo "=== summary"
cat "$OUT/summary.txt"
