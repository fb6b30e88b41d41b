#!/usr/bin/env bash
# CTL-S-R50 on DukeMTMC-reID (256x128 ResNet50, P=16 x K=4, 120 epochs, 3 runs).
# Data: $DATA_ROOT/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test} (default DATA_ROOT=/data).
# ImageNet weights: ./models/resnet50-19c8e357.pth (python -m modelling.pretrained resnet50). Extra KEY VALUE
# pairs are passed on, e.g.
#   train_scripts/dukemtmc/train_ctl_model_s_r50_dukemtmc.sh TEST.ONLY_TEST True MODEL.PRETRAIN_PATH ./logs/dukemtmcreid/256_resnet50/run_0/checkpoints/best.ckpt
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_ROOT=${DATA_ROOT:-/data}
exec ${PYTHON:-python} train_ctl_model.py --config_file=configs/256_resnet50.yml GPU_IDS "[0]" \
    DATASETS.NAMES dukemtmcreid \
    DATASETS.ROOT_DIR "$DATA_ROOT" \
    SOLVER.IMS_PER_BATCH 16 \
    TEST.IMS_PER_BATCH 128 \
    SOLVER.BASE_LR 0.00035 \
    OUTPUT_DIR "./logs/dukemtmcreid/256_resnet50" \
    DATALOADER.USE_RESAMPLING False \
    "$@"
