"""Dataset registry: a name in ``DATASETS.NAMES`` -> a function ``cfg -> ReIDSplits``.

Adding a dataset = one file with a builder plus one line here; no trainer changes.
"""
from .bases import DatasetError, ImageRecord, ReIDSplits
from .df1 import build_df1
from .dukemtmcreid import build_dukemtmcreid
from .image_folder import build_image_folder
from .market1501 import build_market1501
from .reid_folder import build_reid_folder
from .street2shop import build_street2shop

DATASET_REGISTRY = {
    "market1501": build_market1501,
    "dukemtmcreid": build_dukemtmcreid,
    "reid_folder": build_reid_folder,
    "image_folder": build_image_folder,
    "street2shop": build_street2shop,
    "df1": build_df1,
}


def build_dataset(cfg) -> ReIDSplits:
    """The train/query/gallery records named by ``cfg.DATASETS.NAMES``."""
    return DATASET_REGISTRY[cfg.DATASETS.NAMES](cfg)


__all__ = ["DATASET_REGISTRY", "DatasetError", "ImageRecord", "ReIDSplits", "build_dataset"]
