"""COCO-ReID loader (street2shop, df1): splits by source, relabelling, path defaults, bad input, scripts."""
import copy
import json
import logging
import os
import re
import subprocess

import pytest
from PIL import Image

from config import ConfigError, load_config
from conftest import ROOT
from datasets import DATASET_REGISTRY, DatasetError, build_dataset
from datasets.coco_reid import default_split_path, load_coco_reid

# Folders whose names hold "train" and "gallery": the loader must not read meaning from paths.
JSON_DIR = "train_jsons"
ROOT_NAME = "gallery_train_root"

# (file name, pair id, source) per split. Train pair 30 has one image (dropped); gallery pair 40 is
# a distractor with no query.
VALID = {
    "train": [("a.jpg", 10, "user"), ("b.jpg", 10, "user"), ("c.jpg", 10, "shop"), ("d.jpg", 20, "user"),
              ("e.jpg", 20, "shop"), ("f.jpg", 5, "shop"), ("g.jpg", 5, "shop"), ("h.jpg", 30, "user")],
    "query": [("q2.jpg", 10, "user"), ("q1.jpg", 10, "user"), ("q3.jpg", 20, "user")],
    "gallery": [("g1.jpg", 10, "shop"), ("g2.jpg", 20, "shop"), ("g3.jpg", 40, "shop")],
}


def coco(entries) -> dict:
    images = [{"id": i, "file_name": name, "width": 8, "height": 8} for i, (name, _, _) in enumerate(entries, 1)]
    annotations = [{"id": i, "image_id": i, "pair_id": pid, "source": src, "bbox": [0, 0, 8, 8]}
                   for i, (_, pid, src) in enumerate(entries, 1)]
    return {"images": images, "annotations": annotations}


def write_set(base, data: dict, *, prefix: str = "train_set") -> str:
    """Image files for every listed image plus ``<split><suffix>.json`` files; returns the train JSON path."""
    root = base / ROOT_NAME
    for split, content in data.items():
        for image in content["images"]:
            path = root / split / image["file_name"]
            if not path.exists() and not image.get("no_file"):
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
        json_dir = base / JSON_DIR
        json_dir.mkdir(exist_ok=True)
        name = prefix.replace("train", split) + ".json"
        (json_dir / name).write_text(json.dumps({**content, "images": [
            {k: v for k, v in image.items() if k != "no_file"} for image in content["images"]]}))
    return str(base / JSON_DIR / (prefix + ".json"))


def cfg_for(base, train_json: str, mode: str = "error", name: str = "street2shop", **extra):
    opts = ["DATASETS.NAMES", name, "DATASETS.ROOT_DIR", str(base / ROOT_NAME),
            "DATASETS.JSON_TRAIN_PATH", train_json, "DATASETS.ON_BAD_ANNOTATION", mode]
    for key, value in extra.items():
        opts += [key, value]
    return load_config(opts=opts)


def valid_data() -> dict:
    return {split: coco(entries) for split, entries in VALID.items()}


# ----------------------------------------------------------------------------------- valid input
@pytest.mark.parametrize("name", ["street2shop", "df1"])
def test_registered_and_loads_splits(tmp_path, name):
    assert name in DATASET_REGISTRY
    train_json = write_set(tmp_path, valid_data())
    splits = build_dataset(cfg_for(tmp_path, train_json, name=name))
    assert splits.name == name
    root = str(tmp_path / ROOT_NAME)
    # pair 30 (one image) dropped; 5, 10, 20 relabelled 0, 1, 2; camid 0 user, 1 shop
    assert [(os.path.relpath(r.path, root), r.pid, r.camid) for r in splits.train] == [
        ("train/a.jpg", 1, 0), ("train/b.jpg", 1, 0), ("train/c.jpg", 1, 1), ("train/d.jpg", 2, 0),
        ("train/e.jpg", 2, 1), ("train/f.jpg", 0, 1), ("train/g.jpg", 0, 1)]
    assert [(os.path.relpath(r.path, root), r.pid, r.camid) for r in splits.query] == [
        ("query/q1.jpg", 10, 0), ("query/q2.jpg", 10, 0), ("query/q3.jpg", 20, 0)]
    assert [(os.path.relpath(r.path, root), r.pid, r.camid) for r in splits.gallery] == [
        ("gallery/g1.jpg", 10, 1), ("gallery/g2.jpg", 20, 1), ("gallery/g3.jpg", 40, 1)]
    assert splits.num_train_pids == 3


def test_pair_id_zero_is_shifted_so_it_is_not_a_distractor(tmp_path):
    """Evaluation reads pid <= 0 as a distractor (individual gallery items in centroid mode):
    a product numbered 0 (the Street2Shop converter used to number from 0) must not be one."""
    data = {split: [(name, pid - 10, source) for name, pid, source in entries] for split, entries in VALID.items()}
    splits = build_dataset(cfg_for(tmp_path, write_set(tmp_path, {k: coco(v) for k, v in data.items()})))
    assert [r.pid for r in splits.query] == [1, 1, 11]  # pair ids 0, 0, 10 shifted by +1
    assert [r.pid for r in splits.gallery] == [1, 11, 31]


def test_single_image_train_pairs_are_logged(tmp_path, caplog):
    train_json = write_set(tmp_path, valid_data())
    with caplog.at_level(logging.INFO, logger="datasets.coco_reid"):
        load_coco_reid(cfg_for(tmp_path, train_json), "street2shop")
    assert "dropped 1 train pair ids with a single image" in caplog.text


def test_json_paths_replace_train_in_file_name_only():
    assert default_split_path("/d/train_v2/train_320.json", "query") == "/d/train_v2/query_320.json"
    assert default_split_path("/d/train_v2/s2s_train.json", "gallery") == "/d/train_v2/s2s_gallery.json"
    with pytest.raises(DatasetError, match=r"JSON_QUERY_PATH"):
        default_split_path("/d/train_v2/all.json", "query")


def test_explicit_query_and_gallery_paths_win(tmp_path):
    data = valid_data()
    train_json = write_set(tmp_path, data)
    other = copy.deepcopy(data)
    other["query"]["annotations"] = other["query"]["annotations"][2:]  # only q3 (pair 20)
    write_set(tmp_path, other, prefix="train_other")
    cfg = cfg_for(tmp_path, train_json, **{"DATASETS.JSON_QUERY_PATH": str(tmp_path / JSON_DIR / "query_other.json")})
    splits = build_dataset(cfg)
    assert [r.pid for r in splits.query] == [20] and len(splits.gallery) == 3


def test_split_follows_source_not_paths(tmp_path):
    # query files named like shop images, in a root whose path holds "gallery" and "train"
    data = valid_data()
    for image in data["query"]["images"]:
        image["file_name"] = "shop_" + image["file_name"]
    splits = build_dataset(cfg_for(tmp_path, write_set(tmp_path, data)))
    assert {r.camid for r in splits.query} == {0} and {r.camid for r in splits.gallery} == {1}


def test_absolute_file_name_used_as_is(tmp_path):
    data = valid_data()
    elsewhere = tmp_path / "elsewhere.jpg"
    Image.new("RGB", (8, 8)).save(elsewhere)
    data["gallery"]["images"][2]["file_name"] = str(elsewhere)
    splits = build_dataset(cfg_for(tmp_path, write_set(tmp_path, data)))
    assert str(elsewhere) in [r.path for r in splits.gallery]


ONLY_TEST = {"TEST.ONLY_TEST": "True", "MODEL.PRETRAIN_PATH": "model.ckpt"}  # the dataset read never opens it


def test_an_evaluation_only_read_needs_no_train_json(tmp_path):
    """TEST.ONLY_TEST (and the test set of a cross-domain training) reads the query and gallery JSON only."""
    train_json = write_set(tmp_path, valid_data())
    full = build_dataset(cfg_for(tmp_path, train_json))
    (tmp_path / JSON_DIR / "train_set.json").write_text("not JSON")  # would fail if it were read
    tested = build_dataset(cfg_for(tmp_path, train_json, **ONLY_TEST))
    assert tested.train == [] and (tested.query, tested.gallery) == (full.query, full.gallery)
    with pytest.raises(DatasetError, match=str(tmp_path / JSON_DIR / "train_set.json")):
        build_dataset(cfg_for(tmp_path, train_json))  # training still reads it

    # no train JSON named at all: the query and gallery JSON given instead
    paths = {f"DATASETS.JSON_{split.upper()}_PATH": str(tmp_path / JSON_DIR / f"{split}_set.json")
             for split in ("query", "gallery")}
    named = build_dataset(cfg_for(tmp_path, "", **paths, **ONLY_TEST))
    assert (named.query, named.gallery) == (full.query, full.gallery)
    with pytest.raises(DatasetError, match=r"JSON_TRAIN_PATH is empty.*or DATASETS\.JSON_QUERY_PATH and "
                                           r"JSON_GALLERY_PATH both"):
        build_dataset(cfg_for(tmp_path, "", **ONLY_TEST))


def test_missing_json_and_empty_train_path(tmp_path):
    train_json = write_set(tmp_path, valid_data())
    os.remove(tmp_path / JSON_DIR / "gallery_set.json")
    with pytest.raises(DatasetError, match=r"gallery JSON not found: .*gallery_set\.json"):
        build_dataset(cfg_for(tmp_path, train_json))
    with pytest.raises(DatasetError, match=r"DATASETS\.JSON_TRAIN_PATH is empty"):
        build_dataset(load_config(opts=["DATASETS.NAMES", "df1"]))


def test_bad_annotation_mode_is_validated():
    with pytest.raises(ConfigError, match=r"DATASETS\.ON_BAD_ANNOTATION = 'ignore'.*'error', 'skip'"):
        load_config(opts=["DATASETS.ON_BAD_ANNOTATION", "ignore"])


# ----------------------------------------------------------------------------------- bad input
def add_annotation(data, split, name, pid, source, ann_id=901, **fields):
    """Append image ``name`` (id 900 + n) and an annotation ``ann_id`` pointing to it."""
    image_id = 900 + len(data[split]["images"])
    data[split]["images"].append({"id": image_id, "file_name": name, "width": 8, "height": 8})
    ann = {"id": ann_id, "image_id": image_id, "pair_id": pid, "source": source, **fields}
    data[split]["annotations"].append(ann)
    return ann


def case_image_id_not_in_images(data):
    data["gallery"]["annotations"].append({"id": 901, "image_id": 777, "pair_id": 10, "source": "shop"})
    return "gallery", "image id not in images", 1, r"annotation 901 \(image id 777\) refers to an image id"


def case_image_file_missing(data):
    add_annotation(data, "query", "ghost.jpg", 10, "user")
    data["query"]["images"][-1]["no_file"] = True
    return "query", "image file missing", 1, r"annotation 901 .*query[/\\]ghost\.jpg does not exist"


def case_zero_area_box(data):
    add_annotation(data, "train", "z.jpg", 10, "user", bbox=[1, 1, 0, 5])
    return "train", "bad bbox", 1, r"annotation 901 .*bbox \[1, 1, 0, 5\] has zero area"


def case_box_outside_image(data):
    add_annotation(data, "train", "o.jpg", 10, "user", bbox=[4, 4, 10, 2])
    return "train", "bad bbox", 1, r"annotation 901 .*outside the 8x8 image"


def case_box_negative_corner(data):
    add_annotation(data, "gallery", "neg.jpg", 10, "shop", bbox=[-2, 0, 4, 4])
    return "gallery", "bad bbox", 1, r"annotation 901 .*starts outside the image"


def case_duplicate_image_id(data):
    data["gallery"]["images"].append({"id": 3, "file_name": "g1.jpg"})  # id 3 is g3.jpg already
    return "gallery", "duplicate image id", 1, r"image id 3 is listed 2 times"


def case_no_pair_id(data):
    del add_annotation(data, "query", "n.jpg", 10, "user")["pair_id"]
    return "query", "no integer pair_id", 1, r"annotation 901 .*has no integer 'pair_id'"


def case_no_source(data):
    del add_annotation(data, "train", "s.jpg", 10, "user")["source"]
    return "train", "no source user/shop", 1, r"annotation 901 .*has no 'source'"


def case_shop_in_query_file(data):
    add_annotation(data, "query", "w.jpg", 10, "shop")
    return "query", "source shop in the query file", 1, r"annotation 901 .*source 'shop'.*move it to the gallery"


def case_user_in_gallery_file(data):
    add_annotation(data, "gallery", "u.jpg", 20, "user")
    return "gallery", "source user in the gallery file", 1, r"annotation 901 .*source 'user'.*move it to the query"


def case_query_pair_without_gallery(data):
    add_annotation(data, "query", "lonely1.jpg", 77, "user")
    add_annotation(data, "query", "lonely2.jpg", 77, "user", ann_id=902)
    return "query", "query pair_id without gallery images", 2, r"query pair_id 77 \(2 images\) has no shop image"


BAD_CASES = [case_image_id_not_in_images, case_image_file_missing, case_zero_area_box, case_box_outside_image,
             case_box_negative_corner, case_duplicate_image_id, case_no_pair_id, case_no_source,
             case_shop_in_query_file, case_user_in_gallery_file, case_query_pair_without_gallery]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.__name__[5:])
def test_bad_input_is_an_error_naming_file_and_id(tmp_path, case):
    data = valid_data()
    split, _, _, pattern = case(data)
    train_json = write_set(tmp_path, data)
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for(tmp_path, train_json, "error"))
    message = str(info.value)
    assert os.path.join(JSON_DIR, f"{split}_set.json") in message
    assert "DATASETS.ON_BAD_ANNOTATION skip" in message
    assert re.search(pattern, message), message


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.__name__[5:])
def test_bad_input_is_skipped_and_counted(tmp_path, case, caplog):
    data = valid_data()
    split, kind, count, _ = case(data)
    train_json = write_set(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="datasets.coco_reid"):
        splits, skipped = load_coco_reid(cfg_for(tmp_path, train_json, "skip"), "street2shop")
    assert dict(skipped) == {(f"{split}_set.json", kind): count}
    assert f"skipped {count} bad annotation(s)" in caplog.text and kind in caplog.text
    expected = {"train": 7, "query": 3, "gallery": 3}
    if case is case_duplicate_image_id:
        expected["gallery"] = 2  # g3.jpg's id is ambiguous now: its annotation is left out
    assert {s: len(getattr(splits, s)) for s in expected} == expected
    assert not any(os.path.basename(r.path).startswith(("ghost", "z.", "o.", "neg.", "n.", "s.", "w.", "u.", "lonely"))
                   for r in splits.train + splits.query + splits.gallery)


# ----------------------------------------------------------------------------------- train scripts
SCRIPTS = {
    "street2shop/train_ctl_model_s_r50_street2shop.sh": ("street2shop", "256_resnet50", "256_128", 48, 128),
    "street2shop/train_ctl_model_l_r50ibn_street2shop.sh": ("street2shop", "320_resnet50_ibn_a", "320_320", 14, 256),
    "df1/train_ctl_model_s_r50_df1.sh": ("df1", "256_resnet50", "256_128", 48, 128),
    "df1/train_ctl_model_l_r50ibn_df1.sh": ("df1", "320_resnet50_ibn_a", "320_320", 12, 256),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_train_script_arguments(tmp_path, script):
    name, config, size, p, test_bs = SCRIPTS[script]
    path = os.path.join(ROOT, "train_scripts", script)
    assert os.access(path, os.X_OK)
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\npwd > "$STUB_OUT"\nfor a in "$@"; do echo "$a" >> "$STUB_OUT"; done\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "DATA_ROOT": "/x", "STUB_OUT": str(tmp_path / "args")}
    subprocess.run([path, "TEST.ONLY_TEST", "True", "MODEL.PRETRAIN_PATH", "m.ckpt"], cwd=str(tmp_path), env=env,
                   check=True, timeout=30)
    cwd, entry, config_arg, *opts = (tmp_path / "args").read_text().splitlines()
    assert os.path.realpath(cwd) == os.path.realpath(ROOT)
    assert (entry, config_arg) == ("train_ctl_model.py", f"--config_file=configs/{config}.yml")
    assert opts[-4:] == ["TEST.ONLY_TEST", "True", "MODEL.PRETRAIN_PATH", "m.ckpt"]
    pairs = dict(zip(opts[0::2], opts[1::2]))
    assert pairs == {"GPU_IDS": "[0]", "DATASETS.NAMES": name, "DATASETS.ROOT_DIR": f"/x/{size}",
                     "DATASETS.JSON_TRAIN_PATH": f"/x/{size}/train.json", "SOLVER.IMS_PER_BATCH": str(p),
                     "TEST.IMS_PER_BATCH": str(test_bs), "SOLVER.BASE_LR": "0.0001",
                     "DATALOADER.USE_RESAMPLING": "False", "MODEL.KEEP_CAMID_CENTROIDS": "False",
                     "OUTPUT_DIR": f"./logs/{name}/{config}", "TEST.ONLY_TEST": "True",
                     "MODEL.PRETRAIN_PATH": "m.ckpt"}
    cfg = load_config(os.path.join(ROOT, "configs", f"{config}.yml"), opts)  # the arguments validate
    assert cfg.MODEL.KEEP_CAMID_CENTROIDS is False and cfg.SOLVER.IMS_PER_BATCH == p


def test_image_id_of_another_type_is_an_error_naming_the_file(tmp_path):
    data = valid_data()
    data["gallery"]["images"][0]["id"] = [1]  # unhashable: was a raw TypeError
    train_json = write_set(tmp_path, data)
    with pytest.raises(DatasetError, match=r"gallery_set\.json: an entry of 'images' has no integer or string 'id'"):
        build_dataset(cfg_for(tmp_path, train_json, "skip"))
