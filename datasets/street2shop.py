"""Street2Shop (Kiapour et al., ICCV 2015) as COCO-ReID JSON: query = street photos, gallery = shop photos.

Make the JSONs and crops with ``python -m datasets.convert_street2shop``; loading and the bad-input
rules are in ``datasets/coco_reid.py``. Report mAP and Acc@k (= rank-k in metrics.json).
"""
from .bases import ReIDSplits
from .coco_reid import build_coco_reid


def build_street2shop(cfg) -> ReIDSplits:
    return build_coco_reid(cfg, "street2shop")
