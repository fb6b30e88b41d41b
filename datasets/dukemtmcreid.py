"""DukeMTMC-reID: ``ROOT_DIR/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}``.

Expected: 16,522 train / 2,228 query / 17,661 gallery images, 702 train ids, cameras 1..8.
"""
import os

from .bases import ReIDSplits, parse_market_layout


def build_dukemtmcreid(cfg) -> ReIDSplits:
    return parse_market_layout(os.path.join(cfg.DATASETS.ROOT_DIR, "DukeMTMC-reID"), "dukemtmcreid",
                               max_camera=8, need_train=not cfg.TEST.ONLY_TEST)
