"""Any folder in the Market-1501 layout, read directly at ``DATASETS.ROOT_DIR``.

``ROOT_DIR/{bounding_box_train,query,bounding_box_test}/<pid>_c<camera>...<ext>``, camera numbers of
any width (c1, c12, c103), jpg/png/bmp/webp. For custom data and ``../shared/data/cuhk03p1``.
"""
from .bases import ReIDSplits, parse_market_layout


def build_reid_folder(cfg) -> ReIDSplits:
    return parse_market_layout(cfg.DATASETS.ROOT_DIR, "reid_folder", max_camera=None,
                               need_train=not cfg.TEST.ONLY_TEST)
