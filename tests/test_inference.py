"""Inference tools: embeddings, gallery search, safe loading, bad input, atomic outputs, ONNX export."""
from __future__ import annotations

import glob
import json
import os
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, expanded_by_hand, tiny_opts

from config import cfg_from_dict
from datasets import DatasetError
from datasets.transforms import build_transforms
from inference import create_embeddings, export_onnx, get_similar
from inference.common import Embedder, list_images, parse_tool_args
from inference.search import Gallery, IndexParams, load_gallery, search
from modelling.ctl_model import CTLModel
from modelling.weights import WeightsError
from utils import eval_reid
from utils.eval_reid import evaluate, pairwise_distance, stable_topk


# ----------------------------------------------------------------------------- fixtures

RESNET18 = {"MODEL.NAME": "resnet18", "MODEL.BACKBONE_EMB_SIZE": "512"}  # the tiny checkpoint's backbone


@pytest.fixture(scope="module")
def tiny_checkpoint(synthetic_root, tmp_path_factory):
    """A ResNet18 (512-d) CTL checkpoint after two steps; its 130 MB are freed when this module ends."""
    from utils.run import main

    out = str(tmp_path_factory.mktemp("tiny_run"))
    opts = tiny_opts(synthetic_root, out, **RESNET18, **{"SOLVER.MAX_EPOCHS": 1, "SOLVER.MAX_ITERS_PER_EPOCH": 2})
    assert main(CTLModel, ["--config_file=", *opts], "") == 0
    os.remove(os.path.join(out, "checkpoints", "best.ckpt"))  # 130 MB of disk the tests never read
    yield os.path.join(out, "checkpoints", "last.ckpt")
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def image_tree(synthetic_root, tmp_path_factory) -> str:
    """person1/ (3 images, one nested deeper), person2/ (2 images + a truncated JPEG),
    group/person3/ (1 image), a text file, a fake PNG, and one image directly in the root."""
    source = sorted(glob.glob(os.path.join(synthetic_root, "market1501", "bounding_box_test", "*.jpg")))
    root = tmp_path_factory.mktemp("tree")
    layout = {"person1/a.jpg": 0, "person1/b.jpg": 1, "person1/deeper/c.jpg": 2, "person2/d.jpg": 3,
              "person2/e.jpg": 4, "group/person3/f.jpg": 5, "loose.jpg": 6}
    for relative, i in layout.items():
        os.makedirs(root / os.path.dirname(relative), exist_ok=True)
        shutil.copy(source[i], root / relative)
    data = open(source[7], "rb").read()
    (root / "person2" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "person1" / "fake.png").write_text("not a picture")
    (root / "notes.txt").write_text("hello")
    return str(root)


GOOD_IMAGES = ["group/person3/f.jpg", "loose.jpg", "person1/a.jpg", "person1/b.jpg", "person1/deeper/c.jpg",
               "person2/d.jpg", "person2/e.jpg"]


def opts(checkpoint: str, root: str, out: str, *extra: str) -> list[str]:
    return ["MODEL.PRETRAIN_PATH", checkpoint, "DATASETS.ROOT_DIR", root, "OUTPUT_DIR", out, "GPU_IDS", "[]",
            "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "3", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """Evaluation's path, written out: the LightningModule's ReIDModel.embed on test-transform tensors."""
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    module = CTLModel(cfg=hparams["cfg"], num_classes=hparams["num_classes"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    transform = build_transforms(cfg_from_dict(hparams["cfg"]), is_train=False)

    def embed(paths: list[str]) -> np.ndarray:
        images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        with torch.no_grad():
            return module.model.embed(images).numpy()
    return embed


def load_all_outputs(folder: str) -> dict[str, np.ndarray]:
    """Every .npy / .npz array in ``folder``, loaded with allow_pickle=False."""
    arrays = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.np[yz]"))):
        loaded = np.load(path, allow_pickle=False)
        if path.endswith(".npz"):
            arrays.update({f"{os.path.basename(path)}:{k}": loaded[k] for k in loaded.files})
        else:
            arrays[os.path.basename(path)] = loaded
    assert arrays and all(a.dtype != object for a in arrays.values())
    return arrays


@pytest.fixture(scope="module")
def gallery_dir(tiny_checkpoint, synthetic_root, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("gallery"))
    root = os.path.join(synthetic_root, "market1501", "bounding_box_test")
    assert create_embeddings.main(opts(tiny_checkpoint, root, out, "TEST.IMS_PER_BATCH", "32")) == 0
    return out


# ----------------------------------------------------------------------------- create_embeddings

def test_a_second_run_says_which_gallery_it_replaces(tiny_checkpoint, image_tree, tmp_path, caplog):
    out = str(tmp_path / "out")
    assert create_embeddings.main(opts(tiny_checkpoint, image_tree, out)) == 0
    created = json.load(open(os.path.join(out, "meta.json")))["created"]
    assert "Replacing the gallery" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        assert create_embeddings.main(opts(tiny_checkpoint, os.path.join(image_tree, "person1"), out)) == 0
    assert f"Replacing the gallery in {out} (7 images of {image_tree}, created {created})" in caplog.text


def test_folder_embeddings_equal_evaluation_features_and_skip_bad_files(tiny_checkpoint, reference, image_tree,
                                                                        tmp_path, caplog):
    out = str(tmp_path / "out")
    assert create_embeddings.main(opts(tiny_checkpoint, image_tree, out)) == 0
    paths = open(os.path.join(out, "paths.txt"), encoding="utf-8").read().splitlines()
    assert paths == [os.path.join(image_tree, p) for p in GOOD_IMAGES]
    embeddings = load_all_outputs(out)["embeddings.npy"]
    assert embeddings.dtype == np.float32 and embeddings.shape == (7, 512)
    np.testing.assert_allclose(embeddings, reference(paths), rtol=0, atol=1e-5)
    assert np.abs(np.linalg.norm(embeddings, axis=1) - 1).max() > 0.1  # not normalised

    meta = json.load(open(os.path.join(out, "meta.json")))
    assert (meta["count"], meta["dim"], meta["normalized"], meta["kind"]) == (7, 512, False, "images")
    assert meta["config"]["INPUT"]["SIZE_TEST"] == [64, 32]  # from the checkpoint, not the 256x128 default
    reasons = {os.path.relpath(f["path"], image_tree): f["reason"] for f in meta["skipped"]["files"]}
    assert meta["skipped"]["count"] == 3 and set(reasons) == {"notes.txt", "person1/fake.png",
                                                              "person2/truncated.jpg"}
    assert "extension" in reasons["notes.txt"] and "truncated.jpg" in reasons["person2/truncated.jpg"]
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "Skipped 3 files" in warning and "truncated.jpg" in warning and "fake.png" in warning


def test_centroids_are_mean_embeddings_per_parent_folder(tiny_checkpoint, reference, image_tree, tmp_path):
    out = str(tmp_path / "centroids")
    argv = opts(tiny_checkpoint, image_tree, out, "MODEL.USE_CENTROIDS", "True", "--images-in-subfolders")
    assert create_embeddings.main(argv) == 0
    identities = open(os.path.join(out, "paths.txt"), encoding="utf-8").read().splitlines()
    assert identities == ["group/person3", "person1", "person1/deeper", "person2"]  # the direct parent
    members = json.load(open(os.path.join(out, "members.json")))
    assert [len(members[i]) for i in identities] == [1, 2, 1, 2]
    centroids = np.load(os.path.join(out, "embeddings.npy"), allow_pickle=False)
    for row, identity in enumerate(identities):
        expected = reference(members[identity]).mean(axis=0)
        np.testing.assert_allclose(centroids[row], expected, rtol=0, atol=1e-5)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["kind"] == "centroids" and meta["images_embedded"] == 6
    assert any(f["path"].endswith("loose.jpg") and "subfolder" in f["reason"] for f in meta["skipped"]["files"])


def test_identities_from_top_level_folders_match_the_image_folder_dataset(tiny_checkpoint, reference, image_tree,
                                                                          tmp_path, caplog):
    """--identity-from top: the folder directly under ROOT_DIR, at any depth, as DATASETS.NAMES image_folder
    names an identity (person1/deeper/c.jpg belongs to person1); it implies --images-in-subfolders."""
    from datasets.image_folder import build_image_folder

    out = str(tmp_path / "top")
    assert create_embeddings.main(opts(tiny_checkpoint, image_tree, out, "MODEL.USE_CENTROIDS", "True",
                                       "--identity-from", "top")) == 0
    identities = open(os.path.join(out, "paths.txt"), encoding="utf-8").read().splitlines()
    members = json.load(open(os.path.join(out, "members.json")))
    assert identities == ["group", "person1", "person2"]
    assert {i: sorted(os.path.relpath(p, image_tree) for p in members[i]) for i in identities} == {
        "group": ["group/person3/f.jpg"], "person1": ["person1/a.jpg", "person1/b.jpg", "person1/deeper/c.jpg"],
        "person2": ["person2/d.jpg", "person2/e.jpg"]}
    centroids = np.load(os.path.join(out, "embeddings.npy"), allow_pickle=False)
    for row, identity in enumerate(identities):
        np.testing.assert_allclose(centroids[row], reference(members[identity]).mean(axis=0), rtol=0, atol=1e-5)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert (meta["images_in_subfolders"], meta["identity_from"]) == (True, "top")
    assert create_embeddings.main(opts(tiny_checkpoint, image_tree, str(tmp_path / "none"),
                                       "MODEL.USE_CENTROIDS", "True")) == 2
    assert "MODEL.USE_CENTROIDS True needs --images-in-subfolders or --identity-from" in caplog.text

    # the same tree as the gallery of an image_folder dataset groups the images alike
    root, readable = tmp_path / "dataset", shutil.ignore_patterns("fake.png", "truncated.jpg", "notes.txt")
    for split in ("train", "query"):
        for person in ("person1", "person2"):
            shutil.copytree(os.path.join(image_tree, person), root / split / person, ignore=readable)
    shutil.copytree(image_tree, root / "gallery", ignore=readable)
    cfg = load_config_for_dataset(root)
    gallery = build_image_folder(cfg).gallery
    by_pid = {}
    for record in gallery:
        if record.pid:
            by_pid.setdefault(record.pid, []).append(os.path.relpath(record.path, root / "gallery"))
    assert sorted(sorted(v) for v in by_pid.values()) == sorted(
        sorted(os.path.relpath(p, image_tree) for p in members[i]) for i in identities)


def load_config_for_dataset(root):
    from config import load_config

    return load_config(opts=["DATASETS.NAMES", "image_folder", "DATASETS.ROOT_DIR", str(root),
                             "DATASETS.VERIFY_IMAGES", "True"])


def test_list_file_keeps_its_order_and_resolves_relative_paths(tiny_checkpoint, reference, image_tree, tmp_path):
    list_file = os.path.join(image_tree, "list.txt")
    with open(list_file, "w") as handle:
        handle.write("# a comment\nperson2/e.jpg\n\nmissing.jpg\n" + os.path.join(image_tree, "person1/a.jpg") + "\n")
    out = str(tmp_path / "listed")
    try:
        assert create_embeddings.main(opts(tiny_checkpoint, list_file, out)) == 0
    finally:
        os.remove(list_file)
    paths = open(os.path.join(out, "paths.txt"), encoding="utf-8").read().splitlines()
    assert paths == [os.path.join(image_tree, "person2/e.jpg"), os.path.join(image_tree, "person1/a.jpg")]
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["skipped"]["files"] == [{"path": os.path.join(image_tree, "missing.jpg"), "reason": "file not found"}]
    np.testing.assert_allclose(np.load(os.path.join(out, "embeddings.npy")), reference(paths),
                               rtol=0, atol=1e-5)


def test_empty_folder_is_a_clear_error(tiny_checkpoint, tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert create_embeddings.main(opts(tiny_checkpoint, str(empty), str(tmp_path / "out"))) == 2
    assert f"{empty} holds no image files" in caplog.text
    assert not os.path.exists(tmp_path / "out" / "embeddings.npy")


class _RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_checkpoint_never_executes(image_tree, tmp_path, caplog):
    marker = tmp_path / "MARKER"
    evil = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": _RunsCode(str(marker))}, evil)
    assert create_embeddings.main(opts(evil, image_tree, str(tmp_path / "out"))) == 2
    assert not marker.exists()
    assert f"Cannot load {evil} safely" in caplog.text


def test_imagenet_state_dict_is_rejected_with_a_message_naming_the_file(image_tree, tmp_path, caplog):
    import torchvision

    weights = str(tmp_path / "resnet18_imagenet.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    assert create_embeddings.main(opts(weights, image_tree, str(tmp_path / "out"))) == 2
    assert f"{weights} is not a checkpoint of this project" in caplog.text
    assert "ImageNet weights" in caplog.text


def test_interrupted_write_leaves_no_embeddings_file(tiny_checkpoint, image_tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "embeddings.npy").write_bytes(b"stale output of an earlier run")
    real_fsync, written = os.fsync, []

    def failing_fsync(fd):  # the disk fails after embeddings.npy's bytes went into the temp file
        if ".embeddings.npy." in os.readlink(f"/proc/self/fd/{fd}"):
            written.append(os.fstat(fd).st_size)
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        create_embeddings.main(opts(tiny_checkpoint, image_tree, str(out)))
    assert written and written[0] > 7 * 512 * 4  # it failed mid-write, with the data in the temp file
    assert sorted(os.listdir(out)) == ["meta.json", "paths.txt"]  # no embeddings.npy, no temp file


# ----------------------------------------------------------------------------- the Python API

def test_embedder_takes_paths_pil_images_arrays_and_tensors(tiny_checkpoint, reference, image_tree):
    embedder = Embedder(tiny_checkpoint, {"GPU_IDS": [], "TEST.IMS_PER_BATCH": 2}, device="cpu")
    path = os.path.join(image_tree, "person1", "a.jpg")
    image = Image.open(path).convert("RGB")
    tensor = embedder.transform(image)
    expected = reference([path])
    for given in (path, [path], image, np.asarray(image), tensor, tensor[None]):
        np.testing.assert_allclose(embedder.embed(given), expected, rtol=0, atol=1e-5)
    batch = embedder.embed([path, image, np.asarray(image)])  # two batches of IMS_PER_BATCH 2
    assert batch.shape == (3, 512) and np.allclose(batch, expected, atol=1e-5)
    assert embedder.embed([]).shape == (0, 512)


@pytest.fixture(scope="module")
def cpu_embedder(tiny_checkpoint) -> Embedder:
    return Embedder(tiny_checkpoint, {"GPU_IDS": [], "TEST.IMS_PER_BATCH": 2}, device="cpu")


def test_uint8_tensors_are_images_like_uint8_arrays(cpu_embedder, reference, tmp_path):
    """torchvision.io.read_image gives uint8 (3, H, W): resized, scaled and normalised like the same
    pixels as an (H, W, 3) array (it used to fail with "expected scalar type Byte but found Float")."""
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 256, (50, 23, 3), dtype=np.uint8) for _ in range(3)]  # not INPUT.SIZE_TEST
    files = []
    for i, array in enumerate(arrays):
        files.append(str(tmp_path / f"{i}.png"))  # lossless: the same pixels through evaluation's path
        Image.fromarray(array).save(files[-1])
    expected = reference(files)
    tensors = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    np.testing.assert_allclose(cpu_embedder.embed(tensors[0]), expected[:1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(cpu_embedder.embed(torch.stack(tensors)), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cpu_embedder.embed(tensors), cpu_embedder.embed(arrays), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 50, 23), (2, 3, 128, 64), (1, 64, 32), (4, 64, 32)])
def test_float_tensor_not_at_the_test_size_is_refused(cpu_embedder, shape):
    """A (3, 50, 23) float tensor used to be embedded silently at the wrong resolution."""
    with pytest.raises(ValueError) as error:
        cpu_embedder.embed(torch.zeros(shape))
    message = str(error.value)
    assert "(3, H, W) at INPUT.SIZE_TEST = [64, 32]" in message and "normalised" in message
    assert str(shape[-3:]) in message and "paths, PIL images or uint8" in message


def test_greyscale_arrays_are_replicated_to_three_channels(cpu_embedder):
    grey = np.random.default_rng(8).integers(0, 256, (40, 20), dtype=np.uint8)
    expected = cpu_embedder.embed(np.repeat(grey[:, :, None], 3, axis=2))  # PIL 'L' -> 'RGB'
    for given in (grey, grey[:, :, None], torch.from_numpy(grey)[None]):
        np.testing.assert_allclose(cpu_embedder.embed(given), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 20, 2), (40, 20, 5), (2, 40, 20, 3), (0, 20, 3)])
def test_array_of_another_shape_is_refused_with_the_accepted_shapes(cpu_embedder, shape):
    with pytest.raises(ValueError, match=r"\(H, W\), \(H, W, 1\), \(H, W, 3\)") as error:
        cpu_embedder.embed(np.zeros(shape, np.uint8))
    assert str(shape) in str(error.value)


def test_missing_image_path_or_broken_link_is_named(cpu_embedder, image_tree, tmp_path, monkeypatch):
    """It used to say "Image file disappeared after the dataset was indexed", after the batches before it."""
    missing = str(tmp_path / "missing.jpg")
    monkeypatch.setattr(cpu_embedder, "embed_tensor", lambda images: pytest.fail("embedded before the check"))
    with pytest.raises(DatasetError, match=f"image file not found: {missing}$"):
        cpu_embedder.embed([os.path.join(image_tree, "person1", "a.jpg")] * 2 + [missing])  # batches of 2
    link = tmp_path / "link.jpg"
    os.symlink(tmp_path / "moved_away.jpg", link)
    with pytest.raises(DatasetError) as error:
        cpu_embedder.embed(link)
    assert f"{link} is a broken symbolic link" in str(error.value) and "moved_away.jpg" in str(error.value)


def test_embedder_channels_last_as_training_decides_it(tiny_checkpoint, reference, image_tree):
    """MODEL.CHANNELS_LAST: "auto" is off on the CPU; "on" runs model and input in channels_last, same embeddings."""
    path = os.path.join(image_tree, "person1", "a.jpg")
    plain = Embedder(tiny_checkpoint, {"GPU_IDS": []}, device="cpu")
    assert not plain.channels_last
    fast = Embedder(tiny_checkpoint, {"GPU_IDS": [], "MODEL.CHANNELS_LAST": "on"}, device="cpu")
    conv = fast.model.backbone.conv1.weight
    assert fast.channels_last and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    np.testing.assert_allclose(fast.embed(path), reference([path]), rtol=0, atol=1e-5)


def test_config_cannot_change_the_checkpoints_architecture(tiny_checkpoint):
    with pytest.raises(WeightsError, match="MODEL.NAME is 'resnet50' in the config but the checkpoint"):
        Embedder(tiny_checkpoint, {"MODEL.NAME": "resnet50", "GPU_IDS": []}, device="cpu")


def test_training_recipe_as_config_file_keeps_the_checkpoints_model(tiny_checkpoint, image_tree, tmp_path):
    """The documented commands pass the recipe (ResNet50, 256x128) as --config_file: a checkpoint of
    another backbone and size must still load as it was trained (it used to exit 2 on MODEL.NAME)."""
    recipe = os.path.join(ROOT, "configs", "256_resnet50.yml")
    embedder = Embedder(tiny_checkpoint, {"GPU_IDS": []}, device="cpu", config_file=recipe)
    saved = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]["cfg"]
    assert embedder.cfg.MODEL.NAME == saved["MODEL"]["NAME"] == "resnet18"
    assert list(embedder.cfg.INPUT.SIZE_TEST) == list(saved["INPUT"]["SIZE_TEST"]) != [256, 128]
    argv = ["--config_file=" + recipe, *opts(tiny_checkpoint, image_tree, str(tmp_path / "out"))]
    assert create_embeddings.main(argv) == 0


def test_tool_flags_may_follow_the_key_value_pairs():
    args = parse_tool_args(get_similar.build_parser(),
                           ["OUTPUT_DIR", "--x", "--topk", "3", "DATASETS.ROOT_DIR", "d", "--html", "--index=ivf"])
    assert args.opts == ["OUTPUT_DIR", "--x", "DATASETS.ROOT_DIR", "d"]
    assert (args.topk, args.html, args.index) == (3, True, "ivf")


# ----------------------------------------------------------------------------- search

def brute_force(query: np.ndarray, gallery: np.ndarray, metric: str, normalize: bool) -> np.ndarray:
    """float64 distances, written out plainly."""
    q, g = query.astype(np.float64), gallery.astype(np.float64)
    if normalize or metric == "cosine":
        q, g = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    if metric == "cosine":
        return 1 - q @ g.T
    return ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("feat_norm", [None, "False"])  # None: the checkpoint's TEST.FEAT_NORM (True)
def test_get_similar_exact_equals_brute_force(tiny_checkpoint, reference, synthetic_root, gallery_dir, tmp_path,
                                              feat_norm):
    out = str(tmp_path / "results")
    queries = os.path.join(synthetic_root, "market1501", "query")
    argv = opts(tiny_checkpoint, queries, out, "TEST.IMS_PER_BATCH", "32", "--gallery_data", gallery_dir,
                "--topk", "10", *(["TEST.FEAT_NORM", feat_norm] if feat_norm else []))
    assert get_similar.main(argv) == 0
    normalize = feat_norm is None
    arrays = load_all_outputs(out)
    indices, distances = arrays["results.npz:indices"], arrays["results.npz:distances"]
    query_paths = arrays["results.npz:query_paths"]
    assert query_paths.dtype.kind == "U" and len(query_paths) == 20 and indices.shape == (20, 10)
    query_feats = arrays["query_embeddings.npy"]
    np.testing.assert_allclose(query_feats, reference(list(query_paths)), atol=1e-5)
    gallery_feats = np.load(os.path.join(gallery_dir, "embeddings.npy"), allow_pickle=False)
    reference = brute_force(query_feats, gallery_feats, "euclidean", normalize)
    expected = np.argsort(reference, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(indices, expected)
    if normalize:  # the default ranks exactly as evaluation does (no camera filtering for plain search)
        ranked = evaluate(query_feats, gallery_feats, np.ones(20, int), np.ones(len(gallery_feats), int),
                          np.zeros(20, int), np.ones(len(gallery_feats), int), return_topk=10,
                          camera_aware=False, max_rank=1)
        assert np.array_equal(indices, ranked["topk_indices"])
    np.testing.assert_allclose(distances, np.take_along_axis(reference, expected, 1), rtol=1e-4, atol=1e-3)
    results = json.load(open(os.path.join(out, "results.json")))
    gallery_paths = open(os.path.join(gallery_dir, "paths.txt"), encoding="utf-8").read().splitlines()
    first = results["queries"][0]
    assert first["query"] == query_paths[0]
    assert [r["path"] for r in first["results"]] == [gallery_paths[i] for i in expected[0]]
    assert results["metric"] == "euclidean" and results["index"] == "exact" and results["topk"] == 10
    assert results["normalized"] is normalize


def test_get_similar_query_expansion_searches_the_expanded_queries(tiny_checkpoint, synthetic_root, gallery_dir,
                                                                    tmp_path):
    """--query_expansion 3: the ranking of the queries expanded by utils.eval_reid.query_expansion (the one
    evaluation uses), normalised, even with TEST.FEAT_NORM False; query_embeddings.npy keeps the embeddings."""
    out = str(tmp_path / "results")
    queries = os.path.join(synthetic_root, "market1501", "query")
    argv = opts(tiny_checkpoint, queries, out, "TEST.IMS_PER_BATCH", "32", "--gallery_data", gallery_dir,
                "--topk", "10", "TEST.FEAT_NORM", "False", "--query_expansion", "3", "--qe_alpha", "2")
    assert get_similar.main(argv) == 0
    arrays = load_all_outputs(out)
    query_feats = arrays["query_embeddings.npy"]
    gallery_feats = np.load(os.path.join(gallery_dir, "embeddings.npy"), allow_pickle=False)
    expanded = expanded_by_hand(query_feats.astype(np.float64), gallery_feats.astype(np.float64), 3, 2.0)
    normalised = gallery_feats / np.linalg.norm(gallery_feats, axis=1, keepdims=True)
    expected = np.argsort(brute_force(expanded, normalised, "euclidean", False), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(arrays["results.npz:indices"], expected)
    plain = np.argsort(brute_force(query_feats, gallery_feats, "euclidean", True), axis=1, kind="stable")[:, :10]
    assert not np.array_equal(expected, plain)  # the expansion changed some rankings
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["query_expansion"] == {"k": 3, "alpha": 2.0} and results["normalized"] is True
    bad = opts(tiny_checkpoint, queries, str(tmp_path / "bad"), "--gallery_data", gallery_dir,
               "--query_expansion", "-1")
    assert get_similar.main(bad) == 2


@pytest.mark.parametrize("metric,normalize", [("euclidean", True), ("cosine", False)])
def test_exact_search_ranks_like_a_stable_argsort(tmp_path, metric, normalize):
    rng = np.random.default_rng(3)
    gallery = rng.normal(size=(300, 16)).astype(np.float32)
    gallery[7] = gallery[3]  # an exact tie: the lower index ranks first
    query = np.concatenate([gallery[3:4] + 0.01, rng.normal(size=(40, 16)).astype(np.float32)])
    g = Gallery(str(tmp_path), gallery, [str(i) for i in range(300)], "images", {})
    reference = brute_force(query, gallery, metric, normalize)
    for k in (5, 300):  # top-k, and the whole gallery (--topk 0)
        indices, distances = search(query, g, k, metric, normalize=normalize)
        np.testing.assert_array_equal(indices, np.argsort(reference, axis=1, kind="stable")[:, :k])
        np.testing.assert_allclose(distances, np.sort(reference, axis=1)[:, :k], atol=1e-5)
    assert list(indices[0, :2]) == [3, 7]


@pytest.mark.parametrize("metric,normalize", [("euclidean", True), ("euclidean", False), ("cosine", False)])
def test_exact_search_ranks_with_evaluations_distances_bit_for_bit(tmp_path, monkeypatch, metric, normalize):
    """Not only the same order up to rounding: the same float32 distances, so near-ties go the same way."""
    rng = np.random.default_rng(5)
    gallery = (rng.normal(size=(500, 64)) * rng.uniform(0.5, 3.0, size=(500, 1))).astype(np.float32)
    query = (rng.normal(size=(70, 64)) * rng.uniform(0.5, 3.0, size=(70, 1))).astype(np.float32)
    monkeypatch.setattr(eval_reid, "BLOCK_ELEMENTS", 500 * 16)  # several distance blocks, as on a big gallery
    g = Gallery(str(tmp_path), gallery, [str(i) for i in range(500)], "images", {})
    indices, distances = search(query, g, 500, metric, normalize=normalize)
    expected = pairwise_distance(query, gallery, metric, feat_norm=normalize).numpy()
    np.testing.assert_array_equal(distances, np.take_along_axis(expected, indices, axis=1))
    np.testing.assert_array_equal(indices, np.argsort(expected, axis=1, kind="stable"))
    g_pids = np.arange(500) % 50 + 1
    ranked = evaluate(query, gallery, g_pids[:70], g_pids, np.zeros(70), np.ones(500), metric=metric,
                      feat_norm=normalize, camera_aware=False, return_topk=500)
    np.testing.assert_array_equal(indices, ranked["topk_indices"])


def test_stable_topk_breaks_ties_by_lower_column():
    dist = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.25, 0.5], [3.0, 2.0, 1.0, 0.0, 0.0, 0.0]])
    cols = stable_topk(dist, 3)  # what exact search ranks with
    assert cols.tolist() == [[4, 1, 2], [3, 4, 5]]
    assert dist.gather(1, cols).tolist() == [[0.25, 0.5, 0.5], [0.0, 0.0, 0.0]]


def clustered(rng, n: int, dim: int, clusters: int) -> np.ndarray:
    centers = rng.normal(size=(clusters, dim))
    return (centers[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_search_recall_and_index_reuse(tmp_path, kind, caplog):
    rng = np.random.default_rng(11)
    data = clustered(rng, 4100, 32, 200)
    gallery, query = data[:4000], data[4000:]
    np.save(tmp_path / "embeddings.npy", gallery)
    g = Gallery(str(tmp_path), gallery, [str(i) for i in range(4000)], "images", {})
    exact, _ = search(query, g, 10, "euclidean")
    approx, approx_dist = search(query, g, 10, "euclidean", kind=kind, params=IndexParams(nprobe=8))
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.95
    np.testing.assert_allclose(approx_dist, brute_force(query, gallery, "euclidean", False)[
        np.arange(100)[:, None], approx], rtol=1e-4, atol=1e-3)
    index_file = tmp_path / f"index_{kind}.faiss"
    assert index_file.exists() and json.load(open(tmp_path / f"index_{kind}.json"))["key"]["count"] == 4000
    caplog.clear()
    again, _ = search(query, g, 10, "euclidean", kind=kind, params=IndexParams(nprobe=8))
    assert "Reusing index" in caplog.text and np.array_equal(again, approx)
    changed = gallery.copy()
    changed[0] += 1  # another gallery: the checksum differs, the saved index must not be used
    np.save(tmp_path / "embeddings.npy", changed)
    caplog.clear()
    search(query, Gallery(str(tmp_path), changed, g.labels, "images", {}), 10, "euclidean", kind=kind)
    assert "rebuilding" in caplog.text


def test_gallery_of_another_dimension_is_a_clear_error(tiny_checkpoint, image_tree, tmp_path, caplog):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    np.save(gallery / "embeddings.npy", np.zeros((2, 2048), np.float32))
    (gallery / "paths.txt").write_text("a.jpg\nb.jpg\n")
    argv = opts(tiny_checkpoint, image_tree, str(tmp_path / "out"), "--gallery_data", str(gallery))
    assert get_similar.main(argv) == 2
    assert f"Gallery {gallery / 'embeddings.npy'} holds 2048-d embeddings" in caplog.text
    assert "makes 512-d ones" in caplog.text


def test_gallery_of_another_checkpoint_is_warned_about(tiny_checkpoint, image_tree, gallery_dir, tmp_path, caplog):
    other = str(tmp_path / "copy.ckpt")
    shutil.copy(tiny_checkpoint, other)
    argv = opts(other, image_tree, str(tmp_path / "out"), "--gallery_data", gallery_dir)
    assert get_similar.main(argv) == 0
    assert f"was embedded with {os.path.abspath(tiny_checkpoint)}" in caplog.text
    caplog.clear()
    assert get_similar.main(opts(tiny_checkpoint, image_tree, str(tmp_path / "same"), "--gallery_data", gallery_dir)) == 0
    assert "was embedded with" not in caplog.text


@pytest.mark.parametrize("flag, value", [("--hnsw_m", "0"), ("--nprobe", "0"), ("--nlist", "-5"),
                                         ("--ef_search", "0")])
def test_bad_index_parameter_names_the_flag(tiny_checkpoint, image_tree, gallery_dir, tmp_path, caplog, flag, value):
    """--hnsw_m 0 used to abort the process inside FAISS (exit 134), --nprobe 0 to raise deep in it."""
    argv = opts(tiny_checkpoint, image_tree, str(tmp_path / "out"), "--gallery_data", gallery_dir, flag, value)
    assert get_similar.main(argv) == 2
    assert f"{flag} must be >= " in caplog.text and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["meta.json", "members.json"])
def test_damaged_gallery_json_is_a_clear_error(tiny_checkpoint, image_tree, gallery_dir, tmp_path, caplog, name):
    gallery = tmp_path / "gallery"
    shutil.copytree(gallery_dir, gallery)
    (gallery / name).write_text("{not json")
    argv = opts(tiny_checkpoint, image_tree, str(tmp_path / "out"), "--gallery_data", str(gallery))
    assert get_similar.main(argv) == 2
    assert f"Cannot read {gallery / name}" in caplog.text


def test_images_in_linked_folders_are_listed_once(image_tree, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(os.path.join(image_tree, "person2"), root / "linked")
    os.symlink(root, root / "linked_back")  # a cycle: must not be walked forever
    found = list_images(str(root)).paths
    assert found == [str(root / "linked" / "d.jpg"), str(root / "linked" / "e.jpg"),
                     str(root / "linked" / "truncated.jpg")]


def test_outputs_inside_the_image_folder_are_never_inputs(tiny_checkpoint, image_tree, tmp_path, caplog):
    """OUTPUT_DIR = DATASETS.ROOT_DIR: a re-run used to embed the thumbnails of the first run."""
    folder = str(tmp_path / "tree")
    shutil.copytree(image_tree, folder)
    expected = [os.path.join(folder, p) for p in GOOD_IMAGES]
    assert create_embeddings.main(opts(tiny_checkpoint, folder, folder)) == 0
    search = ("--gallery_data", folder, "--topk", "2", "--html", "--html_thumbs")
    for _ in range(2):
        caplog.clear()
        assert get_similar.main(opts(tiny_checkpoint, folder, folder, *search)) == 0
        queries = [q["query"] for q in json.load(open(os.path.join(folder, "results.json")))["queries"]]
        assert queries == expected
    thumbs = len(os.listdir(os.path.join(folder, "thumbs")))
    assert thumbs >= len(GOOD_IMAGES)
    skipped = f"Skipped {thumbs} files under {os.path.join(folder, 'thumbs')}: thumbnails written by get_similar"
    assert skipped in caplog.text
    caplog.clear()
    assert create_embeddings.main(opts(tiny_checkpoint, folder, folder)) == 0
    assert open(os.path.join(folder, "paths.txt"), encoding="utf-8").read().splitlines() == expected
    assert skipped in caplog.text
    os.symlink(folder, tmp_path / "alias")  # OUTPUT_DIR by another name: real paths are compared
    listed = list_images(folder, output_dir=str(tmp_path / "alias")).paths
    assert listed == sorted(expected + [os.path.join(folder, "person1", "fake.png"),
                                        os.path.join(folder, "person2", "truncated.jpg")])


def test_listing_skips_files_linked_from_output_dir(image_tree, tmp_path):
    root, out = tmp_path / "root", tmp_path / "root" / "out"
    out.mkdir(parents=True)
    shutil.copy(os.path.join(image_tree, "loose.jpg"), out / "result.jpg")
    os.symlink(out / "result.jpg", root / "linked.jpg")
    os.symlink(out, root / "linked_out")
    shutil.copy(os.path.join(image_tree, "loose.jpg"), root / "input.jpg")
    images = list_images(str(root), output_dir=str(out))
    assert images.paths == [str(root / "input.jpg")]
    list_file = root / "list.txt"
    list_file.write_text("input.jpg\nlinked.jpg\nout/result.jpg\n")
    assert list_images(str(list_file), output_dir=str(out)).paths == [str(root / "input.jpg")]
    assert list_images(str(root)).paths == [str(root / n) for n in ("input.jpg", "linked.jpg", "linked_out/result.jpg",
                                                                    "out/result.jpg")]


def test_html_thumbs_of_earlier_runs_are_removed(tiny_checkpoint, image_tree, gallery_dir, tmp_path):
    out, unrelated = tmp_path / "out", tmp_path / "out" / "thumbs" / "mine.jpg"
    report = ("--gallery_data", gallery_dir, "--topk", "1", "--html", "--html_thumbs")
    assert get_similar.main(opts(tiny_checkpoint, image_tree, str(out), *report)) == 0
    earlier = set(os.listdir(out / "thumbs"))
    unrelated.write_bytes(b"not written by the tool")
    single = os.path.join(image_tree, "person1", "a.jpg")
    assert get_similar.main(opts(tiny_checkpoint, single, str(out), *report)) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    now = set(os.listdir(out / "thumbs")) - {"mine.jpg"}
    assert len(now) == 2 and now < earlier and all(f"thumbs/{name}" in page for name in now)
    assert unrelated.exists()  # only the tool's own thumbnails are removed
    assert get_similar.main(opts(tiny_checkpoint, single, str(out), "--gallery_data", gallery_dir)) == 0
    assert os.listdir(out / "thumbs") == ["mine.jpg"]  # no report, no thumbnails


def test_onnx_model_that_onnxruntime_refuses_exits_2(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("NOT_IMPLEMENTED: Could not find an implementation for Conv(1)")

    monkeypatch.setattr(export_onnx, "check_parity", refuse)
    monkeypatch.setattr(export_onnx, "export_bytes", lambda *args: b"not used")
    assert export_onnx.main(["MODEL.PRETRAIN_PATH", tiny_checkpoint, "OUTPUT_DIR", str(tmp_path), "GPU_IDS", "[]"]) == 2
    assert "does not load in onnxruntime: RuntimeError: NOT_IMPLEMENTED" in caplog.text
    assert not (tmp_path / "model.onnx").exists()


def test_gallery_paths_with_windows_line_ends_read_as_written(gallery_dir, tmp_path):
    gallery = tmp_path / "gallery"
    shutil.copytree(gallery_dir, gallery)
    written = (gallery / "paths.txt").read_bytes()
    (gallery / "paths.txt").write_bytes(written.replace(b"\n", b"\r\n"))
    assert load_gallery(str(gallery)).labels == written.decode().splitlines()


def test_missing_gallery_is_a_clear_error(tiny_checkpoint, image_tree, tmp_path, caplog):
    argv = opts(tiny_checkpoint, image_tree, str(tmp_path / "out"), "--gallery_data", str(tmp_path / "nowhere"))
    assert get_similar.main(argv) == 2
    assert f"Gallery file not found: {tmp_path / 'nowhere' / 'embeddings.npy'}" in caplog.text


# ----------------------------------------------------------------------------- ONNX

@pytest.fixture(scope="module")
def onnx_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert export_onnx.main(["MODEL.PRETRAIN_PATH", tiny_checkpoint, "OUTPUT_DIR", str(out), "GPU_IDS", "[]",
                             "--opset", "17"]) == 0
    return out


def test_onnx_export_matches_pytorch(tiny_checkpoint, image_tree, onnx_dir):
    import onnxruntime as ort

    info = json.load(open(onnx_dir / "model.json"))
    assert info["input"]["shape"] == ["batch", 3, 64, 32] and max(info["parity_max_abs_diff"].values()) < 1e-4
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    embedder = Embedder(tiny_checkpoint, {"GPU_IDS": []}, device="cpu")
    paths = [os.path.join(image_tree, p) for p in GOOD_IMAGES[:5]]
    images = torch.stack([embedder.preprocess(p) for p in paths]).numpy()
    got = session.run(["embeddings"], {"images": images})[0]  # batch 5: the batch axis is dynamic
    np.testing.assert_allclose(got, embedder.embed(paths), rtol=0, atol=1e-4)

    # A different model fails the parity check.
    with torch.no_grad():
        embedder.model.bnneck.weight.mul_(1.01)
    with pytest.raises(export_onnx.ParityError, match="not written"):
        export_onnx.check_parity((onnx_dir / "model.onnx").read_bytes(), embedder.model, 64, 32, atol=1e-4)


def test_onnx_parity_failure_exits_1_and_writes_no_model(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise export_onnx.ParityError("onnxruntime differs from PyTorch by up to 0.5")

    monkeypatch.setattr(export_onnx, "check_parity", fail)
    monkeypatch.setattr(export_onnx, "export_bytes", lambda *args: b"not used")
    assert export_onnx.main(["MODEL.PRETRAIN_PATH", tiny_checkpoint, "OUTPUT_DIR", str(tmp_path), "GPU_IDS", "[]"]) == 1
    assert "differs from PyTorch" in caplog.text and not (tmp_path / "model.onnx").exists()


def _fake_export(monkeypatch):
    monkeypatch.setattr(export_onnx, "export_bytes", lambda *args: b"onnx bytes")
    monkeypatch.setattr(export_onnx, "check_parity", lambda *args, **kwargs: {1: 0.0, 3: 0.0})


@pytest.mark.parametrize("name", ["model.json", "", "sub/model.onnx", "../model.onnx", ".onnx", "model"])
def test_onnx_name_must_be_a_file_name_ending_in_onnx(tiny_checkpoint, tmp_path, monkeypatch, caplog, name):
    """--name model.json used to overwrite the model with its metadata and exit 0; --name= raised."""
    _fake_export(monkeypatch)
    out = tmp_path / "out"
    argv = ["MODEL.PRETRAIN_PATH", tiny_checkpoint, "OUTPUT_DIR", str(out), "GPU_IDS", "[]", f"--name={name}"]
    assert export_onnx.main(argv) == 2
    assert f"--name must be a file name ending in .onnx (written inside OUTPUT_DIR), got {name!r}" in caplog.text
    assert not out.exists()


def test_onnx_name_sets_both_file_names(tiny_checkpoint, tmp_path, monkeypatch):
    _fake_export(monkeypatch)
    argv = ["MODEL.PRETRAIN_PATH", tiny_checkpoint, "OUTPUT_DIR", str(tmp_path), "GPU_IDS", "[]", "--name", "m.v2.onnx"]
    assert export_onnx.main(argv) == 0
    assert sorted(os.listdir(tmp_path)) == ["m.v2.json", "m.v2.onnx"]
    assert (tmp_path / "m.v2.onnx").read_bytes() == b"onnx bytes"
    assert json.load(open(tmp_path / "m.v2.json"))["onnx"] == "m.v2.onnx"


# ----------------------------------------------------------------------------- the scripts run as files

def test_get_similar_starts_as_a_script(monkeypatch, capsys):
    """The original get_similar.py died with a TypeError: run ours as a file (its __main__ block)."""
    monkeypatch.chdir("/")
    monkeypatch.setattr(sys, "argv", ["get_similar.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "inference", "get_similar.py"), run_name="__main__")
    assert exit_info.value.code == 0 and "--gallery_data" in capsys.readouterr().out


def test_embedding_loader_workers_follow_the_device(tiny_checkpoint, monkeypatch):
    """Auto workers: training's rule on the CPU; on a GPU every CPU but one decodes JPEGs."""
    import inference.common as common

    used = []

    class RecordingLoader:
        def __init__(self, *args, num_workers, **kwargs):
            used.append(num_workers)

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(common, "DataLoader", RecordingLoader)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 16)
    embedder = Embedder(tiny_checkpoint, {"GPU_IDS": [], "TEST.IMS_PER_BATCH": 2}, device="cpu")
    paths = [f"{i}.jpg" for i in range(100)]
    embedder.embed_files(paths, progress=False)
    embedder.device = torch.device("cuda")  # only the worker rule and pin_memory read it here
    embedder.embed_files(paths, progress=False)
    embedder.embed_files(paths[:6], progress=False)  # 3 batches: no more workers than batches
    embedder.embed_files(paths, progress=False, num_workers=2)
    assert used == [8, 15, 3, 2]


def test_file_names_that_are_not_utf8_survive_every_output(tiny_checkpoint, image_tree, tmp_path):
    """A Latin-1 file name (bytes that are not UTF-8) reaches Python as a lone surrogate: the
    outputs keep it (paths.txt byte-exact, JSON escaped, HTML percent-encoded) instead of
    crashing after the embedding work; a list file with a byte-order mark reads its first line."""
    folder = tmp_path / "odd"
    folder.mkdir()
    odd_name = os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(os.path.join(image_tree, "person1", "a.jpg"), folder / odd_name)
    shutil.copy(os.path.join(image_tree, "person1", "b.jpg"), folder / "plain.jpg")
    gallery, results = str(tmp_path / "gallery"), str(tmp_path / "results")
    assert create_embeddings.main(opts(tiny_checkpoint, str(folder), gallery)) == 0
    raw_lines = open(os.path.join(gallery, "paths.txt"), "rb").read().splitlines()
    assert raw_lines == [os.fsencode(str(folder / odd_name)), os.fsencode(str(folder / "plain.jpg"))]
    list_file = tmp_path / "list.txt"
    list_file.write_bytes(b"\xef\xbb\xbfodd/plain.jpg\n")
    argv = opts(tiny_checkpoint, str(list_file), results, "--gallery_data", gallery, "--topk", "2", "--html")
    assert get_similar.main(argv) == 0
    found = json.load(open(os.path.join(results, "results.json"), encoding="utf-8"))
    assert found["queries"][0]["query"] == str(folder / "plain.jpg")
    assert {r["path"] for r in found["queries"][0]["results"]} == {str(folder / odd_name), str(folder / "plain.jpg")}
    page = open(os.path.join(results, "index.html"), encoding="utf-8").read()
    assert "caf%E9.jpg" in page


# ----------------------------------------------------------------------------- GeM checkpoints

def test_gem_model_learns_p_and_every_tool_pools_with_the_learned_p(synthetic_root, image_tree, tmp_path):
    from config import cfg_to_dict, load_config
    from modelling.pooling import GeneralizedMeanPooling
    from modelling.weights import check_architecture
    from utils.run import main

    out = str(tmp_path / "gem_run")
    gem = {"MODEL.POOLING": "gem", "MODEL.GEM_P": "3.0", "SOLVER.MAX_EPOCHS": 1, "SOLVER.MAX_ITERS_PER_EPOCH": 3}
    assert main(CTLModel, ["--config_file=", *tiny_opts(synthetic_root, out, **gem)], "") == 0
    ckpt = os.path.join(out, "checkpoints", "last.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    p = saved["state_dict"]["model.pool.p"]
    assert p.shape == (1,) and abs(float(p) - 3.0) > 1e-4  # learned: three Adam steps move it off its start

    # the exponent is not weight-decayed; every other weight is
    cfg = load_config(opts=tiny_opts(synthetic_root, out, **gem))
    main_optimizer = CTLModel(cfg_to_dict(cfg), num_classes=4).configure_optimizers()[0]
    decay = [(group["weight_decay"], [tuple(p.shape) for p in group["params"]]) for group in main_optimizer.param_groups]
    assert decay[1] == (0.0, [(1,)]) and decay[0][0] == cfg.SOLVER.WEIGHT_DECAY > 0

    # TEST.ONLY_TEST, the Embedder and the ONNX export (with its parity check) all use the learned p
    tested = str(tmp_path / "tested")
    assert main(CTLModel, ["--config_file=", *tiny_opts(synthetic_root, tested, **gem, **{
        "TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": ckpt})], "") == 0
    final, again = (json.load(open(os.path.join(d, "metrics.json"))) for d in (out, tested))
    for mode in ("standard", "centroid"):
        for key, value in final[mode].items():
            assert again[mode][key] == pytest.approx(value, abs=1e-6)
    embedder = Embedder(ckpt, {"GPU_IDS": []}, device="cpu")
    assert isinstance(embedder.model.pool, GeneralizedMeanPooling) and torch.equal(embedder.model.pool.p.data, p)
    assert export_onnx.main(["MODEL.PRETRAIN_PATH", ckpt, "OUTPUT_DIR", str(tmp_path / "onnx"), "GPU_IDS", "[]"]) == 0
    with pytest.raises(WeightsError, match="MODEL.POOLING is 'avg' in the config but the checkpoint"):
        Embedder(ckpt, {"GPU_IDS": [], "MODEL.POOLING": "avg"}, device="cpu")
    with pytest.raises(WeightsError, match="MODEL.POOLING: checkpoint 'gem' vs config 'avg'"):
        check_architecture(load_config(opts=tiny_opts(synthetic_root, out)), saved, ckpt)


def test_checkpoint_older_than_the_pooling_key_loads_as_average_pooling(tiny_checkpoint, synthetic_root, reference,
                                                                         image_tree, tmp_path):
    from config import load_config
    from modelling.weights import check_architecture

    saved = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    for key in ("POOLING", "GEM_P", "GEM_P_LEARNED"):
        del saved["hyper_parameters"]["cfg"]["MODEL"][key]
    old = str(tmp_path / "old.ckpt")
    torch.save(saved, old)
    cfg = load_config(opts=tiny_opts(synthetic_root, str(tmp_path), **RESNET18))
    check_architecture(cfg, saved, old)  # no error
    path = os.path.join(image_tree, "person1", "a.jpg")
    np.testing.assert_allclose(Embedder(old, {"GPU_IDS": []}, device="cpu").embed(path), reference([path]),
                               rtol=0, atol=1e-5)


def test_neck_feat_before_embeds_the_pooled_feature_in_every_tool(tiny_checkpoint, image_tree, tmp_path, caplog):
    """TEST.NECK_FEAT is a test-time key: a checkpoint evaluated with the pre-BN feature embeds with it
    (Embedder and ONNX), and a KEY VALUE pair picks the other with a warning."""
    saved = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["cfg"]["TEST"]["NECK_FEAT"] = "before"
    before_ckpt = str(tmp_path / "before.ckpt")
    torch.save(saved, before_ckpt)
    paths = [os.path.join(image_tree, p) for p in GOOD_IMAGES[:3]]
    after = Embedder(tiny_checkpoint, {"GPU_IDS": []}, device="cpu")
    batch = torch.stack([after.preprocess(p) for p in paths])
    with torch.no_grad():
        pooled = after.model(batch).numpy()
    before = Embedder(before_ckpt, {"GPU_IDS": []}, device="cpu")
    assert before.cfg.TEST.NECK_FEAT == "before"
    np.testing.assert_allclose(before.embed(paths), pooled, rtol=0, atol=1e-6)
    assert np.abs(after.embed(paths) - pooled).max() > 0.01
    with caplog.at_level("WARNING"):
        chosen = Embedder(tiny_checkpoint, ["TEST.NECK_FEAT", "before", "GPU_IDS", "[]"], device="cpu")
    np.testing.assert_allclose(chosen.embed(paths), pooled, rtol=0, atol=1e-6)
    assert "TEST.NECK_FEAT = before differs from the checkpoint's after" in caplog.text

    out = tmp_path / "onnx"
    assert export_onnx.main(["MODEL.PRETRAIN_PATH", before_ckpt, "OUTPUT_DIR", str(out), "GPU_IDS", "[]"]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["embeddings"], {"images": batch.numpy()})[0], pooled, rtol=0, atol=1e-4)


def test_flip_feats_embeds_the_mirror_average_in_every_tool(tiny_checkpoint, image_tree, tmp_path):
    """TEST.FLIP_FEATS is a test-time key: a checkpoint evaluated with it embeds with it (Embedder and
    ONNX), as the mean of the embeddings of the image and of its mirror image."""
    saved = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["cfg"]["TEST"]["FLIP_FEATS"] = True
    flip_ckpt = str(tmp_path / "flip.ckpt")
    torch.save(saved, flip_ckpt)
    paths = [os.path.join(image_tree, p) for p in GOOD_IMAGES[:3]]
    plain = Embedder(tiny_checkpoint, {"GPU_IDS": []}, device="cpu")
    batch = torch.stack([plain.preprocess(p) for p in paths])
    expected = (plain.embed(batch) + plain.embed(batch.flip(-1))) / 2
    flip = Embedder(flip_ckpt, {"GPU_IDS": []}, device="cpu")
    assert flip.cfg.TEST.FLIP_FEATS and not plain.cfg.TEST.FLIP_FEATS
    np.testing.assert_allclose(flip.embed(paths), expected, rtol=0, atol=1e-5)
    assert np.abs(plain.embed(paths) - expected).max() > 1e-3
    chosen = Embedder(tiny_checkpoint, ["TEST.FLIP_FEATS", "True", "GPU_IDS", "[]"], device="cpu")
    np.testing.assert_allclose(chosen.embed(paths), expected, rtol=0, atol=1e-5)

    out = tmp_path / "onnx"
    assert export_onnx.main(["MODEL.PRETRAIN_PATH", flip_ckpt, "OUTPUT_DIR", str(out), "GPU_IDS", "[]"]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["embeddings"], {"images": batch.numpy()})[0], expected, rtol=0, atol=1e-4)
