#!/usr/bin/env bash
# CTL-L-R50IBN on street2shop (320_resnet50_ibn_a, P=14 x K=4). Data: the converter's <out>/320_320 folder, e.g.
#   python -m datasets.convert_street2shop ... --out /data/street2shop
# ImageNet weights: ./models/r50_ibn_a.pth (python -m modelling.pretrained resnet50_ibn_a).
# Override with DATA_ROOT=... and PYTHON=...; extra KEY VALUE pairs are passed on, e.g. to test:
#   train_scripts/street2shop/train_ctl_model_l_r50ibn_street2shop.sh TEST.ONLY_TEST True MODEL.PRETRAIN_PATH <run>/checkpoints/best.ckpt
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_ROOT=${DATA_ROOT:-/data/street2shop}
exec ${PYTHON:-python} train_ctl_model.py --config_file=configs/320_resnet50_ibn_a.yml GPU_IDS "[0]" \
    DATASETS.NAMES street2shop \
    DATASETS.ROOT_DIR "$DATA_ROOT/320_320" \
    DATASETS.JSON_TRAIN_PATH "$DATA_ROOT/320_320/train.json" \
    SOLVER.IMS_PER_BATCH 14 \
    TEST.IMS_PER_BATCH 256 \
    SOLVER.BASE_LR 0.0001 \
    DATALOADER.USE_RESAMPLING False \
    MODEL.KEEP_CAMID_CENTROIDS False \
    OUTPUT_DIR "./logs/street2shop/320_resnet50_ibn_a" \
    "$@"
