"""Market-1501: ``ROOT_DIR/market1501/{bounding_box_train,query,bounding_box_test}``.

Expected: 12,936 train / 3,368 query / 15,913 gallery images, 751 train ids, cameras 1..6.
Junk images (pid -1) are dropped; distractors (pid 0) stay in the gallery.
"""
import os

from .bases import ReIDSplits, parse_market_layout


def build_market1501(cfg) -> ReIDSplits:
    return parse_market_layout(os.path.join(cfg.DATASETS.ROOT_DIR, "market1501"), "market1501", max_camera=6,
                               need_train=not cfg.TEST.ONLY_TEST)
