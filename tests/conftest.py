"""Shared fixtures: the repository root on sys.path, tiny generated datasets, a tiny config."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
CUHK03P1 = os.path.join(SHARED_DATA, "cuhk03p1")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """A small synthetic Market-1501-layout dataset (returns the ROOT_DIR holding market1501/)."""
    from datasets.synthetic import generate

    root = str(tmp_path_factory.mktemp("synthetic"))
    generate(root, train_ids=16, test_ids=10, cameras=3, images_per_camera=3, distractors=8, junk=4, seed=1)
    return root


def tiny_opts(root: str, out_dir: str, **overrides) -> list[str]:
    """KEY VALUE pairs for a seconds-long CPU run on the synthetic data. The backbone is a MobileNetV2 from
    scratch: a run's two checkpoints take 50 MB where a ResNet18's took 260 MB, and CI's temporary folder may
    hold less than a gigabyte for the whole suite."""
    opts = {
        "MODEL.NAME": "mobilenet_v2", "MODEL.BACKBONE_EMB_SIZE": "1280", "MODEL.PRETRAINED": "False",
        "INPUT.SIZE_TRAIN": "[64,32]", "INPUT.SIZE_TEST": "[64,32]", "INPUT.PADDING": "4",
        "DATASETS.NAMES": "market1501", "DATASETS.ROOT_DIR": root,
        "DATALOADER.NUM_WORKERS": "0", "DATALOADER.NUM_INSTANCE": "4",
        "SOLVER.IMS_PER_BATCH": "6", "SOLVER.BASE_LR": "0.00035", "SOLVER.MAX_EPOCHS": "2",
        "SOLVER.WARMUP_EPOCHS": "2", "SOLVER.LR_STEPS": "[6]", "SOLVER.EVAL_PERIOD": "1",
        "GPU_IDS": "[]", "REPRODUCIBLE": "True", "REPRODUCIBLE_NUM_RUNS": "1", "OUTPUT_DIR": out_dir,
    }
    opts.update({k: str(v) for k, v in overrides.items()})
    return [item for pair in opts.items() for item in pair]


def read_metrics(out_dir) -> dict:
    """The metrics.json a run or an evaluation wrote into ``out_dir``."""
    with open(os.path.join(out_dir, "metrics.json")) as handle:
        return json.load(handle)


def check_metrics_file(metrics: dict) -> None:
    """Both modes carry every metric, each within [0, 1], and the CMC ranks do not decrease."""
    for mode in ("standard", "centroid"):
        assert set(metrics[mode]) == {"mAP", "mINP", "rank1", "rank5", "rank10", "rank20", "rank50"}
        assert all(0.0 <= v <= 1.0 for v in metrics[mode].values())
        ranks = [metrics[mode][f"rank{k}"] for k in (1, 5, 10, 20, 50)]
        assert ranks == sorted(ranks)


def expanded_by_hand(query, gallery, k, alpha):
    """alpha-QE written out per query in float64: normalise, rank the gallery by cosine similarity
    (ties: lower index), add the k nearest weighted by max(similarity, 0) ** alpha, normalise."""
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    out = []
    for q in query:
        q = q / np.linalg.norm(q)
        sims = gallery @ q
        nearest = sorted(range(len(gallery)), key=lambda j: (-sims[j], j))[:k]
        e = q + sum(max(sims[j], 0.0) ** alpha * gallery[j] for j in nearest)
        out.append(e / np.linalg.norm(e))
    return np.array(out)
