"""The training fast path: device augmentation vs the PIL path, the uint8 loader and image cache,
the "auto" switches, and fast vs plain first-step losses."""
import math
import random
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from config import ConfigError, cfg_to_dict, load_config
from conftest import tiny_opts
from datasets.datamodule import ReIDDataModule, read_image
from datasets.gpu_augment import AugmentParams, apply_augment_params, draw_augment_params, resolve_fast_path
from datasets.samplers import MOCK
from datasets.transforms import RandomErasing, build_transforms
from modelling.bases import ModelBase, compile_in_place
from modelling.ctl_model import CTLModel
from utils.run import main

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def pil_path(image_uint8: torch.Tensor, flip: bool, top: int, left: int, box: list[int], padding: int) -> torch.Tensor:
    """The PIL train transform after Resize (hflip, pad, crop, to_tensor, normalise, erase) with given draws."""
    height, width = image_uint8.shape[-2:]
    img = TF.to_pil_image(image_uint8)
    if flip:
        img = TF.hflip(img)
    img = TF.crop(TF.pad(img, padding), top, left, height, width)
    tensor = TF.normalize(TF.to_tensor(img), MEAN, STD)
    box_top, box_left, box_h, box_w = box
    for c in range(3):  # as datasets.transforms.RandomErasing fills a box
        tensor[c, box_top:box_top + box_h, box_left:box_left + box_w] = MEAN[c]
    return tensor


def draw(batch, size, seed, padding=4, flip_prob=0.5, erase_prob=0.5):
    return draw_augment_params(batch, size, flip_prob=flip_prob, padding=padding, erase_prob=erase_prob,
                               generator=torch.Generator().manual_seed(seed))


def random_uint8(batch, height, width, seed=0):
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- augmentation
def test_device_augmentation_equals_pil_path_with_same_draws():
    images = random_uint8(24, 40, 24)
    params = draw(24, (40, 24), seed=3, padding=5)
    assert params.flip.any() and (~params.flip).any()
    erased = params.erase_box[:, 2] > 0
    assert erased.any() and (~erased).any()
    fast = apply_augment_params(images, params, padding=5, mean=MEAN, std=STD)
    for i in range(len(images)):
        expected = pil_path(images[i], bool(params.flip[i]), int(params.crop_top[i]), int(params.crop_left[i]),
                            params.erase_box[i].tolist(), padding=5)
        torch.testing.assert_close(fast[i], expected, rtol=0, atol=0)


def test_device_augmentation_without_padding_and_with_extreme_offsets():
    images = random_uint8(4, 16, 8, seed=1)
    no_erase = torch.zeros(4, 4, dtype=torch.long)
    for padding, offset in ((0, 0), (3, 0), (3, 6)):
        params = AugmentParams(torch.tensor([True, False, True, False]), torch.full((4,), offset),
                               torch.full((4,), 2 * padding - offset), no_erase)
        fast = apply_augment_params(images, params, padding=padding, mean=MEAN, std=STD)
        for i in range(4):
            expected = pil_path(images[i], bool(params.flip[i]), offset, 2 * padding - offset, [0, 0, 0, 0], padding)
            torch.testing.assert_close(fast[i], expected, rtol=0, atol=0)


def test_mock_images_stay_all_zero():
    images = torch.zeros(4, 3, 16, 8, dtype=torch.uint8)
    is_real = torch.tensor([True, False, True, False])
    params = draw(4, (16, 8), seed=0, padding=2, erase_prob=1.0)
    out = apply_augment_params(images, params, padding=2, mean=MEAN, std=STD, is_real=is_real)
    assert torch.all(out[~is_real] == 0)
    assert torch.all(out[is_real] != 0)  # normalised black is not zero


def test_draw_rates_and_ranges_match_the_configured_probabilities():
    n, height, width, padding = 20000, 64, 32, 4
    params = draw(n, (height, width), seed=5, padding=padding, flip_prob=0.3, erase_prob=0.6)
    tolerance = 4 * math.sqrt(0.25 / n)  # four standard errors
    assert abs(params.flip.float().mean().item() - 0.3) < tolerance
    top, left, box_h, box_w = params.erase_box.unbind(1)
    erased = box_h > 0
    assert abs(erased.float().mean().item() - 0.6) < tolerance
    for offsets in (params.crop_top, params.crop_left):
        counts = torch.bincount(offsets, minlength=2 * padding + 1)
        assert len(counts) == 2 * padding + 1 and counts.min() > 0.8 * n / (2 * padding + 1)
    assert torch.all((box_h < height) & (box_w < width))
    assert torch.all((top >= 0) & (top + box_h <= height) & (left >= 0) & (left + box_w <= width))
    area = (box_h * box_w)[erased].double() / (height * width)
    assert area.min() > 0.015 and area.max() < 0.45  # [0.02, 0.4] up to rounding of the sides
    assert torch.all(box_w[~erased] == 0)


def test_erased_area_distribution_matches_random_erasing():
    """Mean erased fraction of our draws vs datasets.transforms.RandomErasing on blank images."""
    height, width, n = 64, 32, 4000
    random.seed(0)
    reference = RandomErasing(probability=1.0, fill=(1.0, 1.0, 1.0))
    ref_area = torch.tensor([reference(torch.zeros(3, height, width))[0].mean().item() for _ in range(n)])
    params = draw(n, (height, width), seed=1, erase_prob=1.0)
    our_area = (params.erase_box[:, 2] * params.erase_box[:, 3]).double() / (height * width)
    assert abs(our_area.mean().item() - ref_area.mean().item()) < 0.01
    assert abs((our_area == 0).double().mean().item() - (ref_area == 0).double().mean().item()) < 0.02


# ----------------------------------------------------------------------------- AutoAugment
def train_transform_by_hand(cfg, image: Image.Image, seed: int, *, autoaugment: bool) -> torch.Tensor:
    """The PIL train pipeline step by step from the slot's seeds: resize, [RandomApply's draw and ImageNet
    AutoAugment], flip, pad, crop, to tensor, normalise, erase."""
    inp = cfg.INPUT
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        img = T.Resize(list(inp.SIZE_TRAIN))(image)
        if autoaugment:
            torch.rand(1)  # T.RandomApply's draw; with probability 1 it always applies
            augmented = T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)(img)
            assert augmented.tobytes() != img.tobytes(), "pick a seed whose policy changes the image"
            img = augmented
        img = T.RandomCrop(list(inp.SIZE_TRAIN))(T.Pad(inp.PADDING)(T.RandomHorizontalFlip(inp.PROB)(img)))
        tensor = T.Normalize(inp.PIXEL_MEAN, inp.PIXEL_STD)(T.ToTensor()(img))
        return RandomErasing(probability=inp.RE_PROB, fill=inp.PIXEL_MEAN)(tensor)


def random_pil(height: int, width: int, seed: int = 0) -> Image.Image:
    return TF.to_pil_image(random_uint8(1, height, width, seed)[0])


def seeded(transform, image, seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        return transform(image)


def test_autoaugment_off_leaves_the_pil_train_transform_as_before():
    cfg = load_config(opts=["INPUT.SIZE_TRAIN", "[32,16]", "INPUT.PADDING", "3"])
    assert cfg.INPUT.AUTOAUGMENT_PROB == 0.0
    transform = build_transforms(cfg, is_train=True)
    assert not any(isinstance(t, (T.RandomApply, T.AutoAugment)) for t in transform.transforms)
    image = random_pil(45, 20)
    for seed in range(4):
        expected = train_transform_by_hand(cfg, image, seed, autoaugment=False)
        assert torch.equal(seeded(transform, image, seed), expected)


def test_pil_path_autoaugments_after_the_resize_from_the_same_seed():
    cfg = load_config(opts=["INPUT.SIZE_TRAIN", "[32,16]", "INPUT.PADDING", "3", "INPUT.AUTOAUGMENT_PROB", "1"])
    transform = build_transforms(cfg, is_train=True)
    image = random_pil(45, 20)
    for seed in (0, 1):
        expected = train_transform_by_hand(cfg, image, seed, autoaugment=True)
        assert torch.equal(seeded(transform, image, seed), expected)


def _datamodule(root, tmp_path, **overrides) -> ReIDDataModule:
    return ReIDDataModule(load_config(opts=tiny_opts(root, str(tmp_path), **overrides)), seed=0)


def test_device_path_autoaugments_each_cached_image_on_the_host_from_the_slot_seed(synthetic_root, tmp_path):
    common = {"DATALOADER.GPU_AUGMENT": "on", "INPUT.SIZE_TRAIN": "[40,24]"}
    plain = _datamodule(synthetic_root, tmp_path, **common, **{"DATALOADER.CACHE_IMAGES": "on"})
    cached = _datamodule(synthetic_root, tmp_path, **common, **{"DATALOADER.CACHE_IMAGES": "on",
                                                                 "INPUT.AUTOAUGMENT_PROB": "1"})
    decoded = _datamodule(synthetic_root, tmp_path, **common, **{"INPUT.AUTOAUGMENT_PROB": "1"})
    assert cached.fast_path().cache_images and not decoded.fast_path().cache_images
    datasets = [dm.train_dataset(dm.fast_path()) for dm in (plain, cached, decoded)]
    resized = cached.image_cache()
    changed = total = 0
    for slot in next(iter(cached.train_sampler())):
        plain_images, augmented, decoded_images = (dataset[slot][0] for dataset in datasets)
        _pid, indices, seed = slot
        assert torch.equal(plain_images, torch.stack([resized[i] for i in indices]))  # prob 0: only resized
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = []
            for index in indices:  # one draw sequence per slot, image after image
                torch.rand(1)  # T.RandomApply's draw
                expected.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)(resized[index]))
        assert augmented.dtype == torch.uint8 and torch.equal(augmented, torch.stack(expected))
        assert torch.equal(decoded_images, augmented)  # decoded per item or cached: the same images
        changed += sum(not torch.equal(a, b) for a, b in zip(augmented, plain_images))
        total += len(indices)
    assert changed > total // 2


def test_autoaugment_leaves_blank_mocks_blank_on_both_paths(synthetic_root, tmp_path):
    overrides = {"INPUT.AUTOAUGMENT_PROB": "1", "DATALOADER.MOCK_IMAGES": "zeros"}
    pil = _datamodule(synthetic_root, tmp_path, **overrides, **{"DATALOADER.GPU_AUGMENT": "off"})
    device = _datamodule(synthetic_root, tmp_path, **overrides, **{"DATALOADER.CACHE_IMAGES": "on"})
    pid, indices = next(iter(pil.train_groups.items()))
    slot = (pid, (indices[0], MOCK, indices[1], MOCK), 11)
    for dm in (pil, device):
        images, _pids, _camids, is_real = dm.train_dataset(dm.fast_path())[slot]
        assert is_real.tolist() == [True, False, True, False]
        assert torch.all(images[~is_real] == 0) and all(image.any() for image in images[is_real])


def test_cached_loader_uses_workers_only_with_autoaugment(synthetic_root, tmp_path):
    for prob, workers in (("0", 0), ("0.5", 2)):
        dm = _datamodule(synthetic_root, tmp_path, **{"DATALOADER.CACHE_IMAGES": "on", "DATALOADER.NUM_WORKERS": "2",
                                                      "INPUT.AUTOAUGMENT_PROB": prob})
        assert dm._build_train_loader().num_workers == workers


def test_autoaugment_probability_outside_0_1_is_rejected_with_the_key():
    for value in ("-0.1", "1.5", "nan"):
        with pytest.raises(ConfigError, match=r"INPUT\.AUTOAUGMENT_PROB = .* a probability in \[0, 1\]"):
            load_config(opts=["INPUT.AUTOAUGMENT_PROB", value])
    assert load_config(opts=["INPUT.AUTOAUGMENT_PROB", "1"]).INPUT.AUTOAUGMENT_PROB == 1.0


# ----------------------------------------------------------------------------- switches
def test_auto_switches_follow_the_device_and_the_cache_budget():
    cfg = load_config()
    cpu = resolve_fast_path(cfg, use_gpu=False, train_images=12936)
    assert not (cpu.channels_last or cpu.compile or cpu.fused_optimizer or cpu.gpu_augment or cpu.cache_images)
    gpu = resolve_fast_path(cfg, use_gpu=True, train_images=12936)
    assert gpu.channels_last and gpu.compile and gpu.fused_optimizer and gpu.gpu_augment and gpu.cache_images
    assert gpu.cache_gib == pytest.approx(12936 * 3 * 256 * 128 / 2**30)
    small = load_config(opts=["DATALOADER.CACHE_MAX_GB", "1"])
    assert not resolve_fast_path(small, use_gpu=True, train_images=12936).cache_images
    forced = load_config(opts=["DATALOADER.CACHE_IMAGES", "on", "MODEL.CHANNELS_LAST", "on", "MODEL.COMPILE", "off"])
    on_cpu = resolve_fast_path(forced, use_gpu=False, train_images=10)
    assert on_cpu.cache_images and on_cpu.gpu_augment and on_cpu.channels_last and not on_cpu.compile
    no_augment = load_config(opts=["DATALOADER.GPU_AUGMENT", "off"])
    assert not resolve_fast_path(no_augment, use_gpu=True, train_images=10).cache_images


def test_bad_switch_values_are_rejected_with_the_key():
    with pytest.raises(ConfigError, match=r"MODEL\.COMPILE = 'yes'.*'auto', 'on', 'off'"):
        load_config(opts=["MODEL.COMPILE", "yes"])
    with pytest.raises(ConfigError, match=r"DATALOADER\.GPU_AUGMENT.*CACHE_IMAGES 'on'"):
        load_config(opts=["DATALOADER.CACHE_IMAGES", "on", "DATALOADER.GPU_AUGMENT", "off"])
    with pytest.raises(ConfigError, match=r"DATALOADER\.PREFETCH_FACTOR"):
        load_config(opts=["DATALOADER.PREFETCH_FACTOR", "0"])


def _module(root, tmp_path, **overrides):
    cfg = load_config(opts=tiny_opts(root, str(tmp_path), **overrides))
    datamodule = ReIDDataModule(cfg, seed=0)
    torch.manual_seed(0)
    return cfg, datamodule, CTLModel(cfg=cfg_to_dict(cfg), num_classes=datamodule.num_classes, seed=0)


def test_optimizer_is_fused_only_when_asked_on_cpu(synthetic_root, tmp_path):
    _, _, plain = _module(synthetic_root, tmp_path)
    assert not plain.configure_optimizers()[0].defaults.get("fused")
    _, _, fused = _module(synthetic_root, tmp_path, **{"SOLVER.FUSED_OPTIMIZER": "on"})
    assert fused.configure_optimizers()[0].defaults["fused"] is True


def test_compile_is_skipped_with_a_warning_when_unavailable(monkeypatch, caplog):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    module = torch.nn.Conv2d(3, 4, 3)
    with caplog.at_level("WARNING"):
        assert compile_in_place(module, for_gpu=False) is False
    assert "not compiling" in caplog.text and module(torch.zeros(1, 3, 5, 5)).shape == (1, 4, 3, 3)


# ----------------------------------------------------------------------------- loader
def test_uint8_loader_yields_resized_images_the_same_with_and_without_cache(synthetic_root, tmp_path):
    common = {"DATALOADER.GPU_AUGMENT": "on", "DATALOADER.USE_RESAMPLING": "False", "INPUT.SIZE_TRAIN": "[40,24]"}
    _, decoded_dm, _ = _module(synthetic_root, tmp_path, **common)
    _, cached_dm, _ = _module(synthetic_root, tmp_path, **common, **{"DATALOADER.CACHE_IMAGES": "on"})
    assert decoded_dm.fast_path().gpu_augment and not decoded_dm.fast_path().cache_images
    assert cached_dm.fast_path().cache_images
    decoded_batch = next(iter(decoded_dm.train_dataloader()))
    cached_batch = next(iter(cached_dm.train_dataloader()))
    images, pids, _camids, is_real = cached_batch
    assert images.dtype == torch.uint8 and images.shape == (24, 3, 40, 24)
    for a, b in zip(decoded_batch, cached_batch):
        assert torch.equal(a, b)
    # Every cached image is the PIL train transform's Resize of its file.
    cache = cached_dm.image_cache()
    for index in (0, len(cache) - 1):
        resized = TF.pil_to_tensor(TF.resize(read_image(cached_dm.splits.train[index].path), [40, 24]))
        assert torch.equal(cache[index], resized)


# ----------------------------------------------------------------------------- fast vs plain
def test_fast_and_plain_first_step_losses_agree(synthetic_root, tmp_path):
    """Same weights and images: PIL path + fp32 vs device augmentation + channels_last (+ bf16 autocast)."""
    overrides = {"DATALOADER.GPU_AUGMENT": "on", "DATALOADER.USE_RESAMPLING": "False", "SOLVER.IMS_PER_BATCH": "4",
                 # a ResNet (as the recipes): bf16 moves MobileNetV2's depthwise-conv loss by ~4%, past the bound
                 "MODEL.NAME": "resnet18", "MODEL.BACKBONE_EMB_SIZE": "512"}
    cfg, datamodule, plain = _module(synthetic_root, tmp_path, **overrides)
    _, _, fast = _module(synthetic_root, tmp_path, **overrides)
    fast.load_state_dict(plain.state_dict())
    images, pids, _camids, is_real = next(iter(datamodule.train_dataloader()))
    padding = cfg.INPUT.PADDING
    params = draw(len(images), images.shape[-2:], seed=7, padding=padding)
    plain_images = torch.stack([
        pil_path(images[i], bool(params.flip[i]), int(params.crop_top[i]), int(params.crop_left[i]),
                 params.erase_box[i].tolist(), padding) if is_real[i] else torch.zeros(3, *images.shape[-2:])
        for i in range(len(images))])

    def total(module: ModelBase, batch: torch.Tensor) -> float:
        module.train()
        losses, _ = module.compute_losses(module.model(batch), pids, is_real)
        return torch.stack(list(losses.values())).sum().item()

    expected = total(plain, plain_images)
    fast_images = apply_augment_params(images, params, padding=padding, mean=MEAN, std=STD, is_real=is_real)
    fast.model.to(memory_format=torch.channels_last)
    fast_images = fast_images.contiguous(memory_format=torch.channels_last)
    fp32_state = {k: v.clone() for k, v in fast.state_dict().items()}
    assert total(fast, fast_images) == pytest.approx(expected, rel=1e-5)
    fast.load_state_dict(fp32_state)  # undo the BatchNorm running-statistics update of that step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_total = total(fast, fast_images)
    assert bf16_total == pytest.approx(expected, rel=2e-2)


def test_training_runs_with_every_fast_switch_on_cpu(synthetic_root, tmp_path, caplog):
    opts = tiny_opts(synthetic_root, str(tmp_path), **{
        "SOLVER.MAX_EPOCHS": 1, "SOLVER.MAX_ITERS_PER_EPOCH": 2, "DATALOADER.CACHE_IMAGES": "on",
        "MODEL.CHANNELS_LAST": "on", "SOLVER.FUSED_OPTIMIZER": "on", "MODEL.COMPILE": "off"})
    with caplog.at_level("INFO"):
        assert main(CTLModel, ["--config_file=", *opts], "") == 0
    assert ("Fast path: channels_last on, compile off, fused optimizer on, device augmentation on, image cache on"
            in caplog.text)
    assert "Cached 144 train images at 64x32" in caplog.text


def test_batches_without_mocks_take_the_unmasked_losses(synthetic_root, tmp_path, monkeypatch):
    """A batch of real images only: the losses without masks (no device sync) equal the masked ones."""
    cfg, datamodule, module = _module(synthetic_root, tmp_path)
    images, pids, _camids, is_real = next(iter(datamodule.train_dataloader()))
    assert bool(is_real.all())
    module.train()
    features = module.model(images)
    unmasked, unmasked_extras = module.compute_losses(features, pids, None)
    masked, masked_extras = module.compute_losses(features, pids, is_real)
    assert set(unmasked) == set(masked) and "centroid_triplet" in unmasked
    for name in masked:
        assert unmasked[name].item() == pytest.approx(masked[name].item(), rel=1e-6), name
    for name in masked_extras:
        assert unmasked_extras[name].item() == pytest.approx(masked_extras[name].item(), rel=1e-6), name
    # The flag is read from each batch on the CPU and used for that batch only.
    trainer = SimpleNamespace(training=True, precision_plugin=SimpleNamespace(scaler=None))
    monkeypatch.setattr(type(module), "trainer", property(lambda self: trainer))
    seen = []
    monkeypatch.setattr(module, "compute_losses", lambda f, p, r: seen.append(r) or ({"x": f.sum()}, {}))
    monkeypatch.setattr(module, "optimizers", lambda: (MagicMock(), MagicMock()))
    monkeypatch.setattr(module, "manual_backward", lambda loss: None)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    with_mock = is_real.clone()
    with_mock[1] = False
    for flags in (is_real, with_mock, None):
        if flags is not None:
            module.on_before_batch_transfer((images, pids, _camids, flags), 0)
        module.training_step((images, pids, _camids, with_mock if flags is None else flags), 0)
    assert seen[0] is None and torch.equal(seen[1], with_mock) and torch.equal(seen[2], with_mock)


def test_losses_never_read_a_value_from_the_device_with_host_flags(synthetic_root, tmp_path):
    """On the meta device tensors have shapes but no data, so a loss that reads a value from the
    device (a host-device synchronisation on a GPU: a mask selection, int(), .item()) raises there.
    With the loader's flags on the host, neither the masked nor the all-real losses do."""
    cfg, datamodule, module = _module(synthetic_root, tmp_path)
    _images, pids, _camids, is_real = next(iter(datamodule.train_dataloader()))
    is_real = is_real.clone()
    is_real[[1, 6]] = False  # mock images in two identities' groups
    module.train()
    module.to("meta")
    features = torch.randn(len(pids), cfg.MODEL.BACKBONE_EMB_SIZE, device="meta")
    for flags in (is_real, None):
        losses, extras = module.compute_losses(features, pids.to("meta"), flags)
        assert {t.device.type for t in (*losses.values(), *extras.values())} == {"meta"}
        assert "centroid_triplet" in losses
    with pytest.raises(NotImplementedError, match="meta"):  # the check itself: a device mask is read
        module.compute_losses(features, pids.to("meta"), is_real.to("meta"))


def test_masked_copies_keep_their_pixels_on_the_device_path(synthetic_root, tmp_path, monkeypatch):
    """MOCK_IMAGES copy through Lightning's loop on the device augmentation path: the masked slots reach the
    network as the images they copy (not zeroed), flagged not real; with zeros they are blank."""
    seen = []
    original = CTLModel.on_after_batch_transfer

    def spy(self, batch, dataloader_idx):
        out = original(self, batch, dataloader_idx)
        if self.trainer.training:
            seen.append((out[0].detach().clone(), out[3].clone()))
        return out

    monkeypatch.setattr(CTLModel, "on_after_batch_transfer", spy)
    for mock_images in ("copy", "zeros"):
        seen.clear()
        opts = tiny_opts(synthetic_root, str(tmp_path / mock_images), **{
            "SOLVER.MAX_EPOCHS": 1, "SOLVER.MAX_ITERS_PER_EPOCH": 2, "SOLVER.EVAL_PERIOD": 5,
            "DATALOADER.USE_RESAMPLING": False, "DATALOADER.NUM_INSTANCE": 6, "DATALOADER.MOCK_IMAGES": mock_images,
            "DATALOADER.GPU_AUGMENT": "on", "DATALOADER.CACHE_IMAGES": "on"})
        assert main(CTLModel, ["--config_file=", *opts], "") == 0
        assert len(seen) == 2
        for images, is_real in seen:
            assert not bool(is_real.all())  # the synthetic identities have fewer than 6 images
            blank = images.flatten(1).abs().amax(dim=1) == 0
            assert torch.equal(blank, ~is_real) if mock_images == "zeros" else not bool(blank.any())


def test_real_training_skips_the_masks_only_for_batches_without_mocks(synthetic_root, tmp_path, monkeypatch):
    """Through Lightning's loop: resampling (no mocks) gives None, masked mocks give the flags."""
    seen = []
    original = CTLModel.compute_losses

    def spy(self, features, pids, is_real):
        seen.append(is_real)
        return original(self, features, pids, is_real)

    monkeypatch.setattr(CTLModel, "compute_losses", spy)
    for resampling in ("True", "False"):
        seen.clear()
        opts = tiny_opts(synthetic_root, str(tmp_path / resampling), **{
            "SOLVER.MAX_EPOCHS": 1, "SOLVER.MAX_ITERS_PER_EPOCH": 3, "SOLVER.EVAL_PERIOD": 5,
            "DATALOADER.USE_RESAMPLING": resampling, "DATALOADER.NUM_INSTANCE": 6})
        assert main(CTLModel, ["--config_file=", *opts], "") == 0
        assert len(seen) == 3
        if resampling == "True":
            assert all(flags is None for flags in seen)
        else:  # the synthetic identities have fewer than 6 train images: every batch holds mocks
            assert all(flags is not None and not bool(flags.all()) for flags in seen)
