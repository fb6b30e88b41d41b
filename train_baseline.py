#!/usr/bin/env python
"""Train (or evaluate) the BoT-style baseline: CE + batch-hard triplet + center loss, no CTL.

    python train_baseline.py --config_file=configs/256_resnet50.yml DATASETS.ROOT_DIR /data KEY VALUE ...
"""
import sys

from modelling.bases import ModelBase
from utils.run import main

if __name__ == "__main__":
    sys.exit(main(ModelBase, sys.argv[1:], description=__doc__))
