#!/usr/bin/env python
"""Train (or evaluate) the CTL model: CE + batch-hard triplet + center loss + centroid triplet loss.

    python train_ctl_model.py --config_file=configs/256_resnet50.yml DATASETS.ROOT_DIR /data KEY VALUE ...
    python train_ctl_model.py --config_file=... TEST.ONLY_TEST True MODEL.PRETRAIN_PATH run/checkpoints/best.ckpt
"""
import sys

from modelling.ctl_model import CTLModel
from utils.run import main

if __name__ == "__main__":
    sys.exit(main(CTLModel, sys.argv[1:], description=__doc__))
