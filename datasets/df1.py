"""DeepFashion Consumer-to-Shop (Liu et al., CVPR 2016) as COCO-ReID JSON: query = consumer, gallery = shop.

Make the JSONs and crops with ``python -m datasets.convert_deepfashion``; loading and the bad-input
rules are in ``datasets/coco_reid.py``. Report mAP and Acc@k (= rank-k in metrics.json).
"""
from .bases import ReIDSplits
from .coco_reid import build_coco_reid


def build_df1(cfg) -> ReIDSplits:
    return build_coco_reid(cfg, "df1")
