"""The README's extension example, run as written: a CSV dataset, a new backbone and an extra loss term."""
import csv
import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from config import load_config
from conftest import ROOT, tiny_opts
from datasets import DATASET_REGISTRY, build_dataset
from modelling.backbones import BACKBONES


def _readme_example() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    block = text.split("<!-- extending-example:start -->", 1)[1].split("<!-- extending-example:end -->", 1)[0]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def _write_csv_set(synthetic_root, folder):
    """The synthetic Market set as list.csv rows, paths relative to ``folder``; the train pids made
    sparse (1000 + 3 pid) so that the builder's relabelling is needed."""
    splits = build_dataset(load_config(opts=["DATASETS.NAMES", "market1501", "DATASETS.ROOT_DIR", synthetic_root]))
    os.makedirs(folder)
    with open(os.path.join(folder, "list.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        for split, records in (("train", splits.train), ("query", splits.query), ("gallery", splits.gallery)):
            for r in records:
                pid = 1000 + 3 * r.pid if split == "train" else r.pid
                writer.writerow([os.path.relpath(r.path, folder), pid, r.camid, split])
    return splits


def _run(script_dir, opts):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "my_train.py", "--config_file=", *opts], cwd=script_dir, env=env,
                          capture_output=True, text=True, timeout=600)


def test_readme_extension_example_trains_evaluates_and_embeds(synthetic_root, tmp_path):
    (tmp_path / "my_train.py").write_text(_readme_example())
    data = str(tmp_path / "my_set")
    splits = _write_csv_set(synthetic_root, data)
    out = str(tmp_path / "run")
    custom = {"DATASETS.NAMES": "my_csv", "MODEL.NAME": "small_cnn", "MODEL.BACKBONE_EMB_SIZE": 128,
              "SOLVER.MAX_EPOCHS": 2}
    done = _run(tmp_path, tiny_opts(data, out, **custom))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with open(os.path.join(out, "metrics.json")) as handle:
        trained = json.load(handle)
    assert trained["epochs_trained"] == 2
    ckpt = os.path.join(out, "checkpoints", "last.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state["model.backbone.layers.0.weight"].shape == (64, 3, 3, 3)  # the registered backbone
    assert state["model.classifier.weight"].shape[0] == len({r.pid for r in splits.train})  # relabelled classes
    events = EventAccumulator(os.path.join(out, "tensorboard")).Reload()
    norms = [e.value for e in events.Scalars("feature_norm")]
    assert len(norms) == 2 and all(0 < v < 1 for v in norms)  # the extra term, logged per epoch

    # TEST.ONLY_TEST through the same script gives the training's final numbers.
    test_out = str(tmp_path / "test")
    done = _run(tmp_path, tiny_opts(data, test_out, **custom, **{"TEST.ONLY_TEST": True,
                                                                  "MODEL.PRETRAIN_PATH": ckpt}))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(os.path.join(test_out, "metrics.json")) as handle:
        tested = json.load(handle)
    for mode in ("standard", "centroid"):
        for key, value in trained[mode].items():
            assert tested[mode][key] == pytest.approx(value, abs=1e-6)

    # The Python API embeds with the checkpoint once the module that registers the backbone is imported.
    sys.path.insert(0, str(tmp_path))
    try:
        importlib.import_module("my_train")
        from inference.common import Embedder

        embedder = Embedder(ckpt, {"GPU_IDS": []}, device="cpu")
        paths = [r.path for r in splits.query[:3]]
        features = embedder.embed(paths + paths[:1])
        assert features.shape == (4, 128) and np.isfinite(features).all()
        np.testing.assert_array_equal(features[0], features[3])
        assert not np.allclose(features[0], features[1])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_train", None)
        DATASET_REGISTRY.pop("my_csv", None)
        BACKBONES.pop("small_cnn", None)


def test_a_builder_that_forgets_to_relabel_is_stopped_at_start_up(synthetic_root, tmp_path):
    """Train pids that are not 0..N-1 would index past the classifier (or train empty classes)."""
    from datasets import DatasetError
    from datasets.bases import ReIDSplits
    from datasets.datamodule import ReIDDataModule

    cfg = load_config(opts=tiny_opts(synthetic_root, str(tmp_path)))
    splits = build_dataset(cfg)
    sparse = ReIDSplits("sparse", [r._replace(pid=1000 + 3 * r.pid) for r in splits.train], splits.query,
                        splits.gallery)
    with pytest.raises(DatasetError, match=r"Dataset sparse: the train pids must be 0\.\.15 .*got 1000, 1003, "
                                           r"1006, 1009, 1012, \.\.\.; relabel them"):
        ReIDDataModule(cfg, splits=sparse)
