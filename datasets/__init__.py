"""Dataset registry: a name in ``DATASETS.NAMES`` -> a function ``cfg -> ReIDSplits``.

Adding a dataset = one file with a builder plus one line here; no trainer changes.
"""
from .bases import DatasetError, ImageRecord, ReIDSplits
from .df1 import build_df1
from .dukemtmcreid import build_dukemtmcreid
from .image_folder import build_image_folder
from .market1501 import build_market1501
from .msmt17 import build_msmt17
from .reid_folder import build_reid_folder
from .street2shop import build_street2shop

DATASET_REGISTRY = {
    "market1501": build_market1501,
    "dukemtmcreid": build_dukemtmcreid,
    "msmt17": build_msmt17,
    "reid_folder": build_reid_folder,
    "image_folder": build_image_folder,
    "street2shop": build_street2shop,
    "df1": build_df1,
}


# Datasets that may be trained on together: each reads its own subfolder of DATASETS.ROOT_DIR (the others
# read ROOT_DIR itself or the DATASETS.JSON_* files, so two of them would read the same data).
COMBINABLE = ("market1501", "dukemtmcreid", "msmt17")


def dataset_names(cfg) -> list[str]:
    """The training datasets: ``DATASETS.NAMES``, one name or several separated by commas."""
    return [name.strip() for name in cfg.DATASETS.NAMES.split(",") if name.strip()]


def test_dataset_name(cfg) -> str:
    """The dataset whose query and gallery are evaluated: ``DATASETS.TEST_NAME``, else the first training one."""
    return cfg.DATASETS.TEST_NAME.strip() or dataset_names(cfg)[0]


def build_dataset(cfg) -> ReIDSplits:
    """The train records of the ``DATASETS.NAMES`` datasets (several: their union, identities and cameras
    kept apart) and the query/gallery records of the test dataset (``test_dataset_name``)."""
    names, test = dataset_names(cfg), test_dataset_name(cfg)
    if cfg.TEST.ONLY_TEST or names == [test]:
        return DATASET_REGISTRY[test](cfg)
    trains = {name: DATASET_REGISTRY[name](cfg) for name in names}
    if test in trains:
        evaluated = trains[test]
    else:  # read as an evaluation-only run reads it: its train folder is neither needed nor read
        test_cfg = cfg.clone()
        test_cfg.defrost()
        test_cfg.TEST.ONLY_TEST = True
        evaluated = DATASET_REGISTRY[test](test_cfg)
    train, pid_offset, cam_offset = [], 0, 0
    for split in trains.values():
        train += [r._replace(pid=r.pid + pid_offset, camid=r.camid + cam_offset) for r in split.train]
        pid_offset += split.num_train_pids  # each split's train pids are 0..N-1
        cam_offset += max((r.camid for r in split.train), default=-1) + 1
    name = "+".join(names) + f" (test: {test})"
    return ReIDSplits(name=name, train=train, query=evaluated.query, gallery=evaluated.gallery)


__all__ = ["COMBINABLE", "DATASET_REGISTRY", "DatasetError", "ImageRecord", "ReIDSplits", "build_dataset",
           "dataset_names", "test_dataset_name"]
