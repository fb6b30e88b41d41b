#!/usr/bin/env bash
# BoT-style baseline on Market-1501 (256x128 ResNet50, P=16 x K=4, 120 epochs, 1 run).
# Data: $DATA_ROOT/market1501/{bounding_box_train,query,bounding_box_test} (default DATA_ROOT=/data).
# ImageNet weights: ./models/resnet50-19c8e357.pth (python -m modelling.pretrained resnet50). Extra KEY VALUE
# pairs are passed on, e.g.
#   train_scripts/market1501/train_base_model_s_r50_market1501.sh TEST.ONLY_TEST True MODEL.PRETRAIN_PATH ./logs/market1501/256_resnet50_base/checkpoints/best.ckpt
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_ROOT=${DATA_ROOT:-/data}
exec ${PYTHON:-python} train_baseline.py --config_file=configs/256_resnet50.yml GPU_IDS "[0]" \
    DATASETS.NAMES market1501 \
    DATASETS.ROOT_DIR "$DATA_ROOT" \
    SOLVER.IMS_PER_BATCH 16 \
    TEST.IMS_PER_BATCH 128 \
    SOLVER.BASE_LR 0.00035 \
    OUTPUT_DIR "./logs/market1501/256_resnet50_base" \
    DATALOADER.USE_RESAMPLING True \
    MODEL.USE_CENTROIDS False \
    REPRODUCIBLE_NUM_RUNS 1 \
    "$@"
