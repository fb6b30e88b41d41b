#!/usr/bin/env bash
# CTL-S-R50 on df1 (256_resnet50, P=48 x K=4). Data: the converter's <out>/256_128 folder, e.g.
#   python -m datasets.convert_deepfashion ... --out /data/deep_fashion
# ImageNet weights: ./models/resnet50-19c8e357.pth (python -m modelling.pretrained resnet50).
# Override with DATA_ROOT=... and PYTHON=...; extra KEY VALUE pairs are passed on, e.g. to test:
#   train_scripts/df1/train_ctl_model_s_r50_df1.sh TEST.ONLY_TEST True MODEL.PRETRAIN_PATH <run>/checkpoints/best.ckpt
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_ROOT=${DATA_ROOT:-/data/deep_fashion}
exec ${PYTHON:-python} train_ctl_model.py --config_file=configs/256_resnet50.yml GPU_IDS "[0]" \
    DATASETS.NAMES df1 \
    DATASETS.ROOT_DIR "$DATA_ROOT/256_128" \
    DATASETS.JSON_TRAIN_PATH "$DATA_ROOT/256_128/train.json" \
    SOLVER.IMS_PER_BATCH 48 \
    TEST.IMS_PER_BATCH 128 \
    SOLVER.BASE_LR 0.0001 \
    DATALOADER.USE_RESAMPLING False \
    MODEL.KEEP_CAMID_CENTROIDS False \
    OUTPUT_DIR "./logs/df1/256_resnet50" \
    "$@"
