#!/usr/bin/env bash
# BoT-style baseline on DukeMTMC-reID (really the baseline: the original's script ran the CTL model).
# Data: $DATA_ROOT/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test} (default DATA_ROOT=/data).
# ImageNet weights: ./models/resnet50-19c8e357.pth (python -m modelling.pretrained resnet50). Extra KEY VALUE
# pairs are passed on, e.g.
#   train_scripts/dukemtmc/train_base_model_s_r50_dukemtmc.sh TEST.ONLY_TEST True MODEL.PRETRAIN_PATH ./logs/dukemtmcreid/256_resnet50_base/checkpoints/best.ckpt
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_ROOT=${DATA_ROOT:-/data}
exec ${PYTHON:-python} train_baseline.py --config_file=configs/256_resnet50.yml GPU_IDS "[0]" \
    DATASETS.NAMES dukemtmcreid \
    DATASETS.ROOT_DIR "$DATA_ROOT" \
    SOLVER.IMS_PER_BATCH 16 \
    TEST.IMS_PER_BATCH 128 \
    SOLVER.BASE_LR 0.00035 \
    OUTPUT_DIR "./logs/dukemtmcreid/256_resnet50_base" \
    DATALOADER.USE_RESAMPLING True \
    MODEL.USE_CENTROIDS False \
    REPRODUCIBLE_NUM_RUNS 1 \
    "$@"
