"""Fashion converters on tiny raw-format fixtures: crops follow the boxes, outputs load and train.

The fixtures are written in the published raw formats (Street2Shop meta/json + photos, DeepFashion
list files + img/ tree). Every product/item has its own colour, painted inside its box on a
background of another colour, so a crop that follows the box shows no background at all.
"""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import ROOT, tiny_opts
from datasets import convert_deepfashion, convert_street2shop
from datasets.convert_to_jpg import convert_folder
from datasets.fashion_utils import crop_box, fit_to_canvas

SIZE = (64, 32)  # (H, W) of the converted images in these tests
PHOTO_W, PHOTO_H = 40, 30
BACKGROUND = (0, 0, 0)


def colour(index: int) -> tuple[int, int, int]:
    """Distinct saturated colours (value >= 150, far from the black background and from white)."""
    rng = np.random.default_rng(1000 + index)
    hue = (index * 0.137) % 1.0
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), 230, int(rng.integers(150, 230)))).convert("RGB")
    return rgb.getpixel((0, 0))


def paint(path: str, fill, corners=None) -> None:
    """A PHOTO_W x PHOTO_H image: ``fill`` inside the corner box (whole image when None), background outside."""
    image = Image.new("RGB", (PHOTO_W, PHOTO_H), BACKGROUND if corners else fill)
    if corners:
        image.paste(fill, tuple(corners))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, "JPEG", quality=98)


def read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int32)


def close(pixels: np.ndarray, rgb, tol: int = 40) -> np.ndarray:
    return np.abs(pixels - np.asarray(rgb)).max(axis=-1) <= tol


# ----------------------------------------------------------------------------------- Street2Shop fixture
S2S_BOX = {"left": 10, "top": 5, "width": 20, "height": 12}  # corners (10, 5)-(30, 17)
S2S_TRAIN = [("dresses", 101), ("dresses", 102), ("dresses", 103), ("dresses", 104),
             ("tops", 201), ("tops", 202), ("tops", 203), ("tops", 204)]
S2S_TEST = [("dresses", 105), ("dresses", 106), ("tops", 205), ("tops", 206)]


def make_street2shop(root: str) -> None:
    """2 street + 2 shop photos per product, plus: a zero-area box, a missing train shop photo,
    a test product whose shop photos are all missing, and a shop photo of a product without pairs."""
    meta, photos = os.path.join(root, "meta", "json"), os.path.join(root, "photos")
    os.makedirs(meta)
    pairs = {("train", c): [] for c in ("dresses", "tops")} | {("test", c): [] for c in ("dresses", "tops")}
    retrieval = {"dresses": [], "tops": []}
    photo = 1000
    for subset, products in (("train", S2S_TRAIN), ("test", S2S_TEST)):
        for category, product in products:
            fill = colour(product)
            for _ in range(2):
                photo += 1
                paint(os.path.join(photos, f"{photo}.jpg"), fill, (10, 5, 30, 17))
                pairs[(subset, category)].append({"photo": photo, "product": product, "bbox": dict(S2S_BOX)})
            for k in range(2):
                photo += 1
                missing = (product == 206) or (product == 101 and k == 0)
                if not missing:
                    paint(os.path.join(photos, f"{photo}.jpg"), fill)
                retrieval[category].append({"photo": photo, "product": product})
    pairs[("train", "dresses")].append({"photo": 1001, "product": 101,
                                        "bbox": {"left": 3, "top": 3, "width": 0, "height": 9}})
    paint(os.path.join(photos, "9999.jpg"), colour(999))
    retrieval["tops"].append({"photo": 9999, "product": 999})
    for (subset, category), entries in pairs.items():
        with open(os.path.join(meta, f"{subset}_pairs_{category}.json"), "w") as handle:
            json.dump(entries, handle)
    for category, entries in retrieval.items():
        with open(os.path.join(meta, f"retrieval_{category}.json"), "w") as handle:
            json.dump(entries, handle)


@pytest.mark.parametrize("content", ['[{"photo": 1, "product": 2},', '\xff\xfe not text',
                                     '[{"photo": 1, "product": 2, "bbox": {"left": "x"}}]'])
def test_street2shop_damaged_metadata_names_the_file(tmp_path, capsys, content):
    make_street2shop(str(tmp_path / "raw"))
    damaged = tmp_path / "raw" / "meta" / "json" / "train_pairs_tops.json"
    damaged.write_bytes(content.encode("latin-1"))
    with pytest.raises(SystemExit) as exit_info:
        convert_street2shop.main(["--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                                  "--categories", "tops"])
    assert exit_info.value.code == 2 and str(damaged) in capsys.readouterr().err


# ----------------------------------------------------------------------------------- DeepFashion fixture
DF_CONSUMER_BOX = (8, 4, 28, 26)  # corners: a 20 x 22 region (read as x, y, w, h it would be 28 x 26)
DF_SHOP_BOX = (2, 2, 38, 28)
DF_ITEMS = {"train": range(1, 9), "test": range(11, 15), "val": range(21, 23)}


def make_deepfashion(root: str) -> None:
    """train items: 2 consumer + 2 shop images; test: 2 + 2; val: 1 + 1. One train box has zero area."""
    partition, boxes = [], []
    for status, items in DF_ITEMS.items():
        for item in items:
            item_id = f"id_{item:08d}"
            folder = f"img/CLOTHING/Dress/{item_id}"
            count = 1 if status == "val" else 2
            consumers = [f"{folder}/comsumer_{k:02d}.jpg" for k in range(1, count + 1)]
            shops = [f"{folder}/shop_{k:02d}.jpg" for k in range(1, count + 1)]
            for name in consumers:
                paint(os.path.join(root, name), colour(item), DF_CONSUMER_BOX)
                boxes.append(f"{name} 3 2 1 " + " ".join(map(str, DF_CONSUMER_BOX)))
            for name in shops:
                paint(os.path.join(root, name), colour(item), DF_SHOP_BOX)
                boxes.append(f"{name} 3 1 1 " + " ".join(map(str, DF_SHOP_BOX)))
            partition += [f"{c} {s} {item_id} {status}" for c in consumers for s in shops]
    boxes[0] = boxes[0].rsplit(" ", 4)[0] + " 8 4 8 26"  # first train consumer image: zero width
    os.makedirs(os.path.join(root, "Eval"))
    os.makedirs(os.path.join(root, "Anno"))
    header_p = "image_pair_name_1 image_pair_name_2 item_id evaluation_status"
    header_b = "image_name clothes_type source_type pose_type x_1 y_1 x_2 y_2"
    with open(os.path.join(root, "Eval", "list_eval_partition.txt"), "w") as handle:
        handle.write("\n".join([str(len(partition)), header_p, *partition]) + "\n")
    with open(os.path.join(root, "Anno", "list_bbox_consumer2shop.txt"), "w") as handle:
        handle.write("\n".join([str(len(boxes)), header_b, *boxes]) + "\n")


@pytest.fixture(scope="module")
def street2shop_out(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("s2s")
    make_street2shop(str(base / "raw"))
    out = str(base / "out")
    assert convert_street2shop.main(["--root", str(base / "raw"), "--out", out, "--target-size", *map(str, SIZE),
                                     "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def deepfashion_out(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("df")
    make_deepfashion(str(base / "raw"))
    out = str(base / "out")
    assert convert_deepfashion.main(["--root", str(base / "raw"), "--out", out, "--target-size", *map(str, SIZE),
                                     "--workers", "2"]) == 0
    return out


def load_json(out: str, split: str) -> dict:
    with open(os.path.join(out, f"{SIZE[0]}_{SIZE[1]}", f"{split}.json")) as handle:
        return json.load(handle)


# ----------------------------------------------------------------------------------- crop / fit helpers
def test_fit_keeps_aspect_and_centres_on_white():
    canvas, (x, y, w, h) = fit_to_canvas(Image.new("RGB", (20, 10), (255, 0, 0)), 64, 32)
    assert canvas.size == (32, 64) and (x, y, w, h) == (0, 24, 32, 16)
    pixels = np.asarray(canvas)
    assert (pixels[y:y + h, x:x + w] == (255, 0, 0)).all()
    assert (pixels[:y] == 255).all() and (pixels[y + h:] == 255).all()


def test_fit_without_enlarge_is_a_thumbnail():
    canvas, box = fit_to_canvas(Image.new("RGB", (10, 10), (0, 255, 0)), 64, 32, enlarge=False)
    assert canvas.size == (32, 64) and box == [11, 27, 10, 10]


def test_crop_clips_to_image_and_rejects_outside_box():
    image = Image.new("RGB", (40, 30))
    crop, clamped = crop_box(image, (30, 20, 50, 40))
    assert crop.size == (10, 10) and clamped
    assert crop_box(image, (50, 50, 60, 60))[0] is None
    assert crop_box(image, (1, 2, 11, 12)) [0].size == (10, 10)


# ----------------------------------------------------------------------------------- Street2Shop
def test_street2shop_counts_pairs_and_notes(street2shop_out):
    with open(os.path.join(street2shop_out, "conversion_summary.json")) as handle:
        summary = json.load(handle)
    assert summary["images"] == {"train": 31, "query": 6, "gallery": 6}
    assert summary["pair_ids"] == {"train": 8, "query": 3, "gallery": 3}
    notes = summary["skipped_or_changed"]
    assert notes["street boxes of zero area (skipped)"] == 1
    assert notes["missing source image"] == 3  # one train shop photo, both shop photos of product 206
    assert notes["query images whose pair has no gallery image (removed)"] == 2
    assert notes["shop photos of products without pairs (unused)"] == 1
    assert notes["missing metadata files (skipped)"] == 27  # 9 absent categories x 3 files
    assert sorted(os.path.basename(p) for p in summary["skipped_examples"]["missing source image"]) == [
        "1003.jpg", "1047.jpg", "1048.jpg"]
    query, gallery = load_json(street2shop_out, "query"), load_json(street2shop_out, "gallery")
    assert {a["source"] for a in query["annotations"]} == {"user"}
    assert {a["source"] for a in gallery["annotations"]} == {"shop"}
    # pair ids: (category, product) sorted and numbered from 1 (0 reads as a distractor) over train and test
    by_product = {a["product"]: a["pair_id"] for a in query["annotations"] + gallery["annotations"]}
    assert by_product == {105: 5, 106: 6, 205: 11}
    root = os.path.join(street2shop_out, f"{SIZE[0]}_{SIZE[1]}")
    assert sorted(os.listdir(os.path.join(root, "query"))) == sorted(i["file_name"] for i in query["images"])


def test_street2shop_crop_follows_the_box(street2shop_out):
    query = load_json(street2shop_out, "query")
    image = query["images"][0]
    ann = next(a for a in query["annotations"] if a["image_id"] == image["id"])
    # a 20 x 12 box fitted into 32 x 64: scale 1.6 -> 32 x 19, centred vertically
    assert ann["bbox"] == [0, 22, 32, 19] and (image["width"], image["height"]) == (32, 64)
    pixels = read_rgb(os.path.join(street2shop_out, "64_32", "query", image["file_name"]))
    x, y, w, h = ann["bbox"]
    assert close(pixels[y + 2:y + h - 2, x + 2:x + w - 2], colour(ann["product"])).all()
    assert not close(pixels, BACKGROUND, tol=60).any()
    white = (255, 255, 255)  # the canvas above and below the crop (JPEG ringing aside)
    assert close(pixels[:y - 2], white, tol=30).all() and close(pixels[y + h + 2:], white, tol=30).all()


def test_street2shop_photo_name_option(tmp_path):
    make_street2shop(str(tmp_path / "raw"))
    photos = tmp_path / "raw" / "photos"
    for path in photos.iterdir():
        path.rename(photos / f"img_{path.name}")
    out = str(tmp_path / "out")
    assert convert_street2shop.main(["--root", str(tmp_path / "raw"), "--out", out, "--target-size", "16", "16",
                                     "--target-size", "24", "8", "--categories", "tops",
                                     "--photo-name", "img_{id}.jpg"]) == 0
    for size in ("16_16", "24_8"):
        with open(os.path.join(out, size, "train.json")) as handle:
            assert len(json.load(handle)["images"]) == 16
        with Image.open(os.path.join(out, size, "gallery", "shop_1043_tops_205.jpg")) as img:
            assert img.size == tuple(int(v) for v in reversed(size.split("_")))


# ----------------------------------------------------------------------------------- DeepFashion
def test_deepfashion_splits_and_sources(deepfashion_out):
    with open(os.path.join(deepfashion_out, "conversion_summary.json")) as handle:
        summary = json.load(handle)
    assert summary["images"] == {"train": 31, "query": 8, "gallery": 8}
    assert summary["skipped_or_changed"]["boxes of zero area (skipped)"] == 1
    assert summary["skipped_or_changed"]["val user images (unused)"] == 2
    assert summary["skipped_or_changed"]["val shop images (unused)"] == 2
    query, gallery, train = (load_json(deepfashion_out, s) for s in ("query", "gallery", "train"))
    assert {a["source"] for a in query["annotations"]} == {"user"}
    assert {a["source"] for a in gallery["annotations"]} == {"shop"}
    assert {a["pair_id"] for a in query["annotations"]} == set(DF_ITEMS["test"])
    assert {a["pair_id"] for a in train["annotations"]} == set(DF_ITEMS["train"])
    assert sorted({a["source"] for a in train["annotations"]}) == ["shop", "user"]
    assert all("comsumer" in i["file_name"] for i in query["images"])


def test_deepfashion_boxes_are_corners(deepfashion_out):
    query = load_json(deepfashion_out, "query")
    image, ann = query["images"][0], query["annotations"][0]
    # corners (8,4)-(28,26) are a 20 x 22 crop: scale min(32/20, 64/22) = 1.6 -> 32 x 35.
    # Read as x, y, w, h the crop would be 28 x 26 (-> 32 x 30) and hold background.
    assert ann["bbox"] == [0, 14, 32, 35]
    pixels = read_rgb(os.path.join(deepfashion_out, "64_32", "query", image["file_name"]))
    x, y, w, h = ann["bbox"]
    assert close(pixels[y + 2:y + h - 2, x + 2:x + w - 2], colour(ann["pair_id"])).all()
    assert not close(pixels, BACKGROUND, tol=60).any()


def test_deepfashion_gallery_includes_val(tmp_path):
    make_deepfashion(str(tmp_path / "raw"))
    rows = convert_deepfashion.read_partition(str(tmp_path / "raw" / convert_deepfashion.PARTITION_FILE))
    boxes = convert_deepfashion.read_boxes(str(tmp_path / "raw" / convert_deepfashion.BBOX_FILE))
    items, _ = convert_deepfashion.build_items(rows, boxes, str(tmp_path / "raw"), gallery_includes_val=True)
    gallery = [it for it in items if it.split == "gallery"]
    assert len(gallery) == 10 and {it.pair_id for it in gallery} == {11, 12, 13, 14, 21, 22}
    assert all(it.source == "shop" for it in gallery)


def test_deepfashion_malformed_row_names_file_and_line(tmp_path):
    make_deepfashion(str(tmp_path))
    path = tmp_path / convert_deepfashion.BBOX_FILE
    lines = path.read_text().splitlines()
    lines[4] = "img/x.jpg 1 2"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"list_bbox_consumer2shop\.txt, line 5: expected 8 fields"):
        convert_deepfashion.read_boxes(str(path))


# ----------------------------------------------------------------------------------- convert_to_jpg
def test_convert_to_jpg_tolerates_truncated_and_counts(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noise.save(src / "full.jpg", quality=90)
    data = (src / "full.jpg").read_bytes()
    (src / "sub" / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(src / "alpha.png")
    Image.new("P", (8, 8)).save(src / "alpha.gif")  # same stem as alpha.png: a failure, not an overwrite
    (src / "notes.txt").write_text("not an image")
    with pytest.raises(OSError):  # the fixture really is truncated
        with Image.open(src / "sub" / "cut.jpg") as img:
            img.load()

    counts = convert_folder(str(src), str(dst), num_threads=2)
    assert (counts.converted, counts.failed) == (3, 2)
    assert any("notes.txt" in f for f in counts.failures) and any("alpha.png" in f for f in counts.failures)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for name in ("full.jpg", "sub/cut.jpg", "alpha.jpg"):
        with Image.open(dst / name) as img:
            assert img.format == "JPEG" and img.mode == "RGB"


@pytest.mark.parametrize("module", ["convert_street2shop", "convert_deepfashion", "convert_to_jpg"])
def test_converter_cli_help(module):
    result = subprocess.run([sys.executable, "-m", f"datasets.{module}", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: python -m datasets." + module in result.stdout


# ----------------------------------------------------------------------------------- converter output trains
@pytest.mark.parametrize("name", ["street2shop", "df1"])
def test_short_training_run_on_converter_output(name, street2shop_out, deepfashion_out, tmp_path):
    from modelling.ctl_model import CTLModel
    from utils.run import main

    out = street2shop_out if name == "street2shop" else deepfashion_out
    data = os.path.join(out, f"{SIZE[0]}_{SIZE[1]}")
    opts = tiny_opts(data, str(tmp_path / "run"), **{
        "DATASETS.NAMES": name, "DATASETS.JSON_TRAIN_PATH": os.path.join(data, "train.json"),
        "MODEL.KEEP_CAMID_CENTROIDS": "False", "DATALOADER.USE_RESAMPLING": "False",
        "SOLVER.EVAL_PERIOD": "2", "SOLVER.MAX_ITERS_PER_EPOCH": "1", "INPUT.RE_PROB": "0"})
    assert main(CTLModel, ["--config_file=", *opts], "") == 0
    with open(tmp_path / "run" / "metrics.json") as handle:
        metrics = json.load(handle)
    for mode in ("standard", "centroid"):
        values = [metrics[mode][k] for k in ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20", "rank50")]
        assert all(0.0 <= v <= 1.0 for v in values), metrics[mode]
        assert metrics[mode]["rank50"] == 1.0  # every query has its pair among the few gallery items


def test_deepfashion_highres_copies_are_cropped_with_rescaled_boxes(tmp_path):
    """img_highres/ holds the same photos at twice the size, painted in another colour: the crops must
    come from there, with each img/ box doubled (unscaled, the box would cut into background)."""
    raw = tmp_path / "raw"
    make_deepfashion(str(raw))
    for low in glob.glob(str(raw / "img" / "**" / "*.jpg"), recursive=True):
        name = os.path.relpath(low, raw / "img")
        item = int(name.split("id_")[1][:8])
        corners = DF_CONSUMER_BOX if "comsumer" in name else DF_SHOP_BOX
        image = Image.new("RGB", (2 * PHOTO_W, 2 * PHOTO_H), BACKGROUND)
        image.paste(colour(item + 50), tuple(2 * v for v in corners))
        os.makedirs(os.path.dirname(raw / "img_highres" / name), exist_ok=True)
        image.save(raw / "img_highres" / name, "JPEG", quality=98)
    os.remove(raw / "img_highres" / "CLOTHING" / "Dress" / f"id_{DF_ITEMS['test'][0]:08d}" / "shop_01.jpg")
    out = str(tmp_path / "out")
    assert convert_deepfashion.main(["--root", str(raw), "--out", out, "--target-size", *map(str, SIZE),
                                     "--workers", "2", "--highres-dir", "img_highres"]) == 0
    query, gallery = load_json(out, "query"), load_json(out, "gallery")
    assert len(query["images"]) == 2 * len(DF_ITEMS["test"])
    assert len(gallery["images"]) == 2 * len(DF_ITEMS["test"]) - 1  # the missing high-res copy is skipped
    for split, data in (("query", query), ("gallery", gallery)):
        for image, ann in zip(data["images"], data["annotations"]):
            pixels = read_rgb(os.path.join(out, "64_32", split, image["file_name"]))
            x, y, w, h = ann["bbox"]
            assert close(pixels[y + 2:y + h - 2, x + 2:x + w - 2], colour(ann["pair_id"] + 50)).all()
            assert not close(pixels, BACKGROUND, tol=60).any()
