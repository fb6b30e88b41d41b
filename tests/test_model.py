"""Backbones, BNNeck head, and safe, strict weight loading."""
import os

import pytest
import torch
import torchvision

from config import load_config
from modelling.backbones import BACKBONES, build_backbone
from modelling.baseline import ReIDModel
from modelling.weights import WeightsError, load_backbone_weights, safe_load


def _cfg(name, **extra):
    opts = ["MODEL.NAME", name, "MODEL.BACKBONE_EMB_SIZE", str(BACKBONES[name].feat_dim)]
    for k, v in extra.items():
        opts += [k, str(v)]
    return load_config(opts=opts)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet50_ibn_a", "mobilenet_v2"])
def test_backbone_output_channels_match_registry(name):
    net = build_backbone(_cfg(name)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 32))
    assert out.shape[1] == BACKBONES[name].feat_dim


def test_last_stride_controls_map_size():
    with torch.no_grad():
        s1 = build_backbone(_cfg("resnet18", **{"MODEL.LAST_STRIDE": 1})).eval()(torch.randn(1, 3, 256, 128))
        s2 = build_backbone(_cfg("resnet18", **{"MODEL.LAST_STRIDE": 2})).eval()(torch.randn(1, 3, 256, 128))
    assert s1.shape[-2:] == (16, 8) and s2.shape[-2:] == (8, 4)


def test_bnneck_bias_frozen_and_classifier_bias_free():
    model = ReIDModel(_cfg("resnet18"), num_classes=7)
    assert model.bnneck.bias.requires_grad is False and torch.all(model.bnneck.bias == 0)
    assert model.classifier.bias is None and model.classifier.out_features == 7
    model.eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        pre = model(x)
        assert torch.allclose(model.embed(x), model.bnneck(pre))


def test_torchvision_resnet_state_dict_loads_exactly(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone(_cfg("resnet18", **{"MODEL.STEM_RELU": True, "MODEL.LAST_STRIDE": 2}))
    load_backbone_weights(backbone, str(path))
    ours = backbone.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(ours[key], value), key
    # with the stem ReLU on, our backbone computes torchvision's features exactly
    reference.eval()
    backbone.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(reference.children())[:-2])
        assert torch.allclose(backbone(x), trunk(x), atol=1e-5)


def test_wrapped_keys_are_unwrapped(tmp_path):
    state = {f"module.base.{k}": v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state}, path)
    load_backbone_weights(build_backbone(_cfg("resnet18")), str(path))


def test_mismatched_weights_list_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit backbone resnet18.*(unexpected keys|shape mismatches)"):
        load_backbone_weights(build_backbone(_cfg("resnet18")), str(path), model_name="resnet18")
    partial = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
               if not k.startswith("layer4")}
    torch.save(partial, path)
    with pytest.raises(WeightsError, match=r"missing keys: layer4\.0\.bn1\.bias"):
        load_backbone_weights(build_backbone(_cfg("resnet18")), str(path))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match=r"not found: .*nothing\.pth"):
        safe_load(str(tmp_path / "nothing.pth"))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": _Exploit(str(marker))}}, path)
    with pytest.raises(WeightsError, match="Cannot load .*evil.pth safely"):
        safe_load(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_mapped_load_reads_the_same_tensors_and_refuses_the_same_pickles(tmp_path, zip_format):
    """safe_load(mmap=True), used to read a checkpoint's metadata before a resume, maps the tensors of a
    zip-format file and reads a file in torch's old format in full; weights_only holds either way."""
    torch.manual_seed(0)
    saved = {"state_dict": {"w": torch.randn(64, 32), "b": torch.arange(5)}, "epoch": 3}
    path = tmp_path / "c.ckpt"
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    mapped, read = safe_load(str(path), mmap=True), safe_load(str(path))
    assert mapped["epoch"] == read["epoch"] == 3
    for key in ("w", "b"):
        assert torch.equal(mapped["state_dict"][key], saved["state_dict"][key])
        assert torch.equal(read["state_dict"][key], saved["state_dict"][key])
    marker = tmp_path / "pwned"
    torch.save({"x": _Exploit(str(marker))}, tmp_path / "evil.ckpt", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(WeightsError, match="safely"):
        safe_load(str(tmp_path / "evil.ckpt"), mmap=True)
    assert not marker.exists()


def test_ibn_a_state_dict_in_the_published_layout_loads(tmp_path):
    source = build_backbone(_cfg("resnet50_ibn_a"))
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(1000, 2048)  # the published files carry an ImageNet head
    state["module.fc.bias"] = torch.zeros(1000)
    assert "module.layer1.0.bn1.IN.weight" in state and "module.layer3.5.bn1.BN.running_mean" in state
    assert not any(k.startswith("module.layer4.0.bn1.IN") for k in state)  # layer4 has no IBN
    path = tmp_path / "r50_ibn_a.pth"
    torch.save(state, path)
    target = build_backbone(_cfg("resnet50_ibn_a"))
    load_backbone_weights(target, str(path), model_name="resnet50_ibn_a")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


class _LightningLikeStep:
    """What Lightning's fp16 plugin does on each optimizer.step(): scaler.step, then scaler.update."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()


def _one_training_step(scaler, steps=2):
    from types import SimpleNamespace

    from modelling.ctl_model import CTLModel

    cfg = _cfg("resnet18", **{"INPUT.SIZE_TRAIN": "[32, 16]", "SOLVER.IMS_PER_BATCH": 2})
    torch.manual_seed(0)
    model = CTLModel(cfg=__import__("config").cfg_to_dict(cfg), num_classes=3, seed=0)
    network, centers = model.configure_optimizers()
    stubs = (_LightningLikeStep(network, scaler), _LightningLikeStep(centers, scaler))
    model._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    model.optimizers = lambda: stubs
    model.manual_backward = lambda loss: (loss if scaler is None else scaler.scale(loss)).backward()
    model.log = lambda *args, **kwargs: None
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = (torch.randn(8, 3, 32, 16, generator=generator), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
                 torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.bool))
        model.training_step(batch, 0)
    return model.center_loss.centers.detach().clone()


def test_fp16_loss_scale_does_not_change_the_center_step():
    """Under fp16 each Lightning step updates the loss scale; the centers used to be unscaled with
    the scale the network's step had just doubled, so they moved half as far."""
    plain = _one_training_step(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)  # the scale doubles every step
    real_get_scale, reads = scaler.get_scale, []
    scaler.get_scale = lambda: reads.append(1) or real_get_scale()
    scaled = _one_training_step(scaler)
    assert not reads  # get_scale() is .item(): on a GPU, a host sync every step
    scaler.get_scale = real_get_scale
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == 2.0 ** 10  # one update per training step, as with one optimizer
    untouched = _one_training_step(None, steps=0)
    assert (plain - untouched).abs().max() > 1e-4  # the centers did move


# ----------------------------------------------------------------------------- GeM pooling

def _gem_by_hand(x, p, eps=1e-6):
    """Per image and channel, in Python floats: (mean of max(v, eps)^p)^(1/p)."""
    out = []
    for image in x.tolist():
        out.append([(sum(max(v, eps) ** p for row in channel for v in row) / (len(channel) * len(channel[0])))
                    ** (1.0 / p) for channel in image])
    return torch.tensor(out, dtype=torch.float64)


def test_gem_pools_each_channel_by_the_generalised_mean():
    from modelling.pooling import GeneralizedMeanPooling

    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64).relu()  # ReLU maps have exact zeros: eps clamps them
    for p in (1.0, 3.0, 7.5):
        pool = GeneralizedMeanPooling(p)
        got = pool(x)
        assert got.dtype == torch.float64 and got.shape == (2, 5)
        torch.testing.assert_close(got, _gem_by_hand(x, p), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pool(x.float()), _gem_by_hand(x, p).float(), rtol=1e-5, atol=1e-6)
    # p = 1 is average pooling (up to eps where a value is 0); a large p nears max pooling
    torch.testing.assert_close(GeneralizedMeanPooling(1.0)(x), x.mean(dim=(2, 3)), rtol=0, atol=1e-6)
    near_max = GeneralizedMeanPooling(200.0)(x)
    assert torch.all(near_max <= x.amax(dim=(2, 3)) + 1e-12) and torch.all(near_max >= 0.9 * x.amax(dim=(2, 3)))


def test_gem_gradients_reach_the_input_and_p():
    from modelling.pooling import GeneralizedMeanPooling, generalized_mean

    torch.manual_seed(1)
    x = (torch.rand(2, 3, 4, 2, dtype=torch.float64) + 0.1).requires_grad_()
    p = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(generalized_mean, (x, p))
    learned = GeneralizedMeanPooling(3.0)
    learned(x.detach().float()).sum().backward()
    assert learned.p.grad is not None and float(learned.p.grad.abs()) > 0
    fixed = GeneralizedMeanPooling(3.0, learned=False)
    assert not fixed.p.requires_grad and float(fixed.p) == 3.0


def test_gem_of_a_bf16_map_is_computed_in_float32():
    from modelling.pooling import GeneralizedMeanPooling

    torch.manual_seed(2)
    x = (torch.rand(2, 4, 8, 4) * 60).to(torch.bfloat16)  # 60^3 * 32 positions: past bf16's exactness
    got = GeneralizedMeanPooling(3.0)(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _gem_by_hand(x.double(), 3.0).float(), rtol=1e-5, atol=1e-5)


def test_model_pooling_follows_the_config():
    avg = ReIDModel(_cfg("resnet18"), num_classes=3).eval()
    gem = ReIDModel(_cfg("resnet18", **{"MODEL.POOLING": "gem", "MODEL.GEM_P": 4.0}), num_classes=3).eval()
    assert "pool.p" not in avg.state_dict() and float(gem.state_dict()["pool.p"]) == 4.0
    gem.load_state_dict(avg.state_dict(), strict=False)  # same backbone and neck: only the pooling differs
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        maps = avg.backbone(x)
        torch.testing.assert_close(avg(x), maps.mean(dim=(2, 3)))
        torch.testing.assert_close(gem(x), _gem_by_hand(maps.double(), 4.0).float(), rtol=1e-5, atol=1e-6)
    fixed = ReIDModel(_cfg("resnet18", **{"MODEL.POOLING": "gem", "MODEL.GEM_P_LEARNED": False}), num_classes=3)
    assert not fixed.pool.p.requires_grad


def _twin_models(seed: int, first: dict, second: dict) -> tuple[ReIDModel, ReIDModel]:
    """Two resnet18 ReIDModels of the given test-time keys with the same weights, in eval mode, their BNNeck
    statistics moved away from (0, 1) so that the BNNeck changes the features."""
    torch.manual_seed(seed)
    a = ReIDModel(_cfg("resnet18", **first), num_classes=3)
    b = ReIDModel(_cfg("resnet18", **second), num_classes=3)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.bnneck.running_mean.uniform_(-1, 1)
        a.bnneck.running_var.uniform_(0.5, 2)
        b.bnneck.load_state_dict(a.bnneck.state_dict())
    return a.eval(), b.eval()


@pytest.mark.parametrize("neck_feat", ["after", "before"])
def test_flip_feats_average_the_image_and_its_mirror_image(neck_feat):
    # BN statistics away from (0, 1): averaging before the BNNeck must equal averaging after
    plain, flip = _twin_models(4, {"TEST.NECK_FEAT": neck_feat}, {"TEST.NECK_FEAT": neck_feat, "TEST.FLIP_FEATS": True})
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        mirrored = x[..., torch.arange(x.shape[-1] - 1, -1, -1)]  # column j <- column W-1-j
        expected = (plain.embed(x) + plain.embed(mirrored)) / 2
        torch.testing.assert_close(flip.embed(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(flip.embed(mirrored), flip.embed(x), rtol=0, atol=0)  # mirror-invariant
        assert (plain.embed(x) - expected).abs().max() > 1e-3  # the flip changes the embedding


def test_neck_feat_chooses_the_embedding_before_or_after_the_bnneck():
    after, before = _twin_models(3, {}, {"TEST.NECK_FEAT": "before"})  # so that the two features differ
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        pooled = after(x)
        torch.testing.assert_close(before.embed(x), pooled, rtol=0, atol=0)
        torch.testing.assert_close(after.embed(x), after.bnneck(pooled), rtol=0, atol=0)
        assert (after.embed(x) - before.embed(x)).abs().max() > 0.1
