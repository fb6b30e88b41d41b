"""Folder parsers on generated folders with real Market-1501 naming, and the real CUHK03 crops."""
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from config import ConfigError, load_config
from conftest import CUHK03P1
from datasets import DatasetError, build_dataset
from datasets.bases import parse_market_name, to_rgb, verify_images
from datasets.datamodule import read_image


def _touch_images(folder, names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        Image.fromarray(np.full((16, 8, 3), 128, np.uint8)).save(os.path.join(folder, name))


@pytest.fixture()
def market_root(tmp_path):
    base = tmp_path / "market1501"
    # deliberately unsorted creation order; pid -1 junk and pid 0 distractors
    _touch_images(base / "bounding_box_train", ["0007_c2s1_000001_00.jpg", "0002_c1s1_000002_00.jpg",
                                                 "0007_c1s1_000003_00.jpg", "0002_c6s1_000004_00.jpg",
                                                 "-1_c1s1_000005_00.jpg"])
    _touch_images(base / "query", ["0003_c1s1_000010_00.jpg", "0004_c2s1_000011_00.jpg"])
    _touch_images(base / "bounding_box_test", ["0004_c3s1_000020_00.jpg", "0003_c2s1_000021_00.jpg",
                                                "0000_c1s1_000022_00.jpg", "-1_c4s1_000023_00.jpg",
                                                "0003_c1s1_000024_00.jpg"])
    (base / "bounding_box_test" / "Thumbs.db").write_text("not an image")
    return str(tmp_path)


def _cfg(root, name="market1501"):
    return load_config(opts=["DATASETS.NAMES", name, "DATASETS.ROOT_DIR", root])


def test_market_parser_relabels_drops_junk_keeps_distractors(market_root):
    splits = build_dataset(_cfg(market_root))
    assert [(os.path.basename(r.path), r.pid, r.camid) for r in splits.train] == [
        ("0002_c1s1_000002_00.jpg", 0, 0), ("0002_c6s1_000004_00.jpg", 0, 5),
        ("0007_c1s1_000003_00.jpg", 1, 0), ("0007_c2s1_000001_00.jpg", 1, 1)]
    assert [(r.pid, r.camid) for r in splits.query] == [(3, 0), (4, 1)]
    assert [(os.path.basename(r.path), r.pid, r.camid) for r in splits.gallery] == [
        ("0000_c1s1_000022_00.jpg", 0, 0), ("0003_c1s1_000024_00.jpg", 3, 0),
        ("0003_c2s1_000021_00.jpg", 3, 1), ("0004_c3s1_000020_00.jpg", 4, 2)]
    assert splits.num_train_pids == 2


def test_market_rejects_camera_out_of_range(market_root):
    _touch_images(os.path.join(market_root, "market1501", "query"), ["0005_c7s1_000030_00.jpg"])
    with pytest.raises(DatasetError, match=r"Camera number 7 .*0005_c7s1_000030_00\.jpg.*1\.\.6"):
        build_dataset(_cfg(market_root))


def test_unparseable_name_is_named(market_root):
    _touch_images(os.path.join(market_root, "market1501", "query"), ["holiday.jpg"])
    with pytest.raises(DatasetError, match=r"holiday\.jpg"):
        build_dataset(_cfg(market_root))


def test_missing_split_folder_is_named(market_root):
    os.rename(os.path.join(market_root, "market1501", "query"), os.path.join(market_root, "market1501", "q"))
    with pytest.raises(DatasetError, match=r"Missing query folder: .*market1501/query"):
        build_dataset(_cfg(market_root))


def test_empty_split_is_an_error(tmp_path):
    base = tmp_path / "market1501"
    _touch_images(base / "bounding_box_train", ["0001_c1s1_000001_00.jpg"])
    _touch_images(base / "query", ["0002_c1s1_000001_00.jpg"])
    os.makedirs(base / "bounding_box_test")
    with pytest.raises(DatasetError, match="No usable images in gallery folder"):
        build_dataset(_cfg(str(tmp_path)))


def test_reid_folder_reads_wide_camera_numbers(tmp_path):
    _touch_images(tmp_path / "bounding_box_train", ["0001_c12_a.png", "0001_c3_b.png", "0009_c103_c.png"])
    _touch_images(tmp_path / "query", ["0100_c12_q.jpg"])
    _touch_images(tmp_path / "bounding_box_test", ["0100_c103_g.jpg"])
    splits = build_dataset(_cfg(str(tmp_path), "reid_folder"))
    assert [(r.pid, r.camid) for r in splits.train] == [(0, 11), (0, 2), (1, 102)]
    assert splits.query[0].camid == 11 and splits.gallery[0].camid == 102


def test_parse_name_contract():
    assert parse_market_name("/x/-1_c2s1_0.jpg") == (-1, 1)
    assert parse_market_name("0000_c10s1_0.jpg") == (0, 9)
    with pytest.raises(DatasetError):
        parse_market_name("0001_s1_0.jpg")


def test_image_files_of_other_formats_are_counted_in_a_warning(tmp_path, caplog):
    # .tif crops (or .gif, .jfif) used to vanish from the split without a word.
    _touch_images(tmp_path / "bounding_box_train", ["0001_c1_a.jpg", "0001_c2_b.jpg", "0002_c1_a.tif",
                                                    "0002_c2_b.TIFF", "0003_c1_a.gif"])
    (tmp_path / "bounding_box_train" / "notes.txt").write_text("not an image format")
    _touch_images(tmp_path / "query", ["0001_c1_q.jpg"])
    _touch_images(tmp_path / "bounding_box_test", ["0001_c2_g.jpg"])
    with caplog.at_level("WARNING", logger="datasets.bases"):
        splits = build_dataset(_cfg(str(tmp_path), "reid_folder"))
    assert len(splits.train) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"Left 3 image file(s) out of the train split ({tmp_path / 'bounding_box_train'}): .gif (1), .tif (1), "
        ".tiff (1) not among the formats read (.jpg, .jpeg, .png, .bmp, .webp); convert them "
        "(e.g. python -m datasets.convert_to_jpg)."]


def test_images_in_per_identity_subfolders_are_pointed_out(tmp_path):
    _touch_images(tmp_path / "bounding_box_train" / "0001", ["0001_c1_a.jpg", "0001_c2_b.jpg"])
    _touch_images(tmp_path / "query", ["0001_c1_q.jpg"])
    _touch_images(tmp_path / "bounding_box_test", ["0001_c2_g.jpg"])
    with pytest.raises(DatasetError, match=r"No usable images in train folder .*; its 1 subfolder\(s\) are not "
                                           r"searched: put the images directly in it, or, for images in one folder per identity, use "
                                           r"DATASETS\.NAMES image_folder\."):
        build_dataset(_cfg(str(tmp_path), "reid_folder"))


def test_root_dir_one_level_off_names_where_the_split_folders_are(market_root):
    market = os.path.join(market_root, "market1501")
    # reid_folder given the folder that holds market1501/: used to say only "Missing train folder"
    with pytest.raises(DatasetError, match=rf"reid_folder {re.escape(market_root)} holds none of the folders "
                                           rf"bounding_box_train, query, bounding_box_test\. Split folders were "
                                           rf"found in {re.escape(market)}: check DATASETS\.ROOT_DIR"):
        build_dataset(_cfg(market_root, "reid_folder"))
    # market1501 given the market1501 folder itself
    with pytest.raises(DatasetError, match=rf"not found: {re.escape(market)}/market1501\. Split folders were found "
                                           rf"in {re.escape(market)}:"):
        build_dataset(_cfg(market))
    # the official archive's folder name, not renamed
    os.rename(market, os.path.join(market_root, "Market-1501-v15.09.15"))
    with pytest.raises(DatasetError, match=r"Split folders were found in .*Market-1501-v15\.09\.15:"):
        build_dataset(_cfg(market_root))
    with pytest.raises(DatasetError, match=r"not found: /nonexistent_dataset_root/market1501$"):
        build_dataset(_cfg("/nonexistent_dataset_root"))


def test_pid_too_large_for_int64_is_named_with_the_allowed_range():
    # used to parse and crash at evaluation with "Overflow when unpacking long long"
    with pytest.raises(DatasetError, match=r"Identity 99999999999999999999 in '/x/99999999999999999999_c1s1_"
                                           r"000001_00\.jpg' is out of range .*1\.\.2147483647"):
        parse_market_name("/x/99999999999999999999_c1s1_000001_00.jpg")
    assert parse_market_name("2147483647_c1s1_0.jpg") == (2**31 - 1, 0)
    with pytest.raises(DatasetError, match=r"Identity 2147483648 .*out of range"):
        parse_market_name("2147483648_c1s1_0.jpg")
    with pytest.raises(DatasetError, match=r"Camera number 99999999999 in '0001_c99999999999_0\.jpg' .*"
                                           r"1\.\.2147483647"):
        parse_market_name("0001_c99999999999_0.jpg")  # reid_folder: no camera limit of its own


def test_pid_zero_left_out_of_train_and_query_is_counted_in_a_warning(tmp_path, caplog):
    # Custom data numbered from 0: identity 0 follows the Market-1501 convention (distractor,
    # gallery only), but no longer disappears without a word.
    _touch_images(tmp_path / "bounding_box_train", ["0000_c1_a.jpg", "0000_c2_b.jpg", "0000_c2_c.jpg",
                                                    "0001_c1_a.jpg", "0001_c2_b.jpg"])
    _touch_images(tmp_path / "query", ["0000_c1_q.jpg", "0001_c1_q.jpg"])
    _touch_images(tmp_path / "bounding_box_test", ["0000_c2_g.jpg", "0001_c2_g.jpg"])
    with caplog.at_level("WARNING", logger="datasets.bases"):
        splits = build_dataset(_cfg(str(tmp_path), "reid_folder"))
    assert splits.num_train_pids == 1 and [r.pid for r in splits.query] == [1]
    assert [r.pid for r in splits.gallery] == [0, 1]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # once per split, none for the gallery
    assert warnings[0].startswith("Left 3 image(s) of pid 0 out of the train split (")
    assert warnings[1].startswith("Left 1 image(s) of pid 0 out of the query split (")
    for message in warnings:
        assert "pid 0 marks distractors in the Market-1501 naming" in message
        assert "number identities from 1" in message


def test_market_without_pid_zero_in_train_and_query_warns_nothing(market_root, caplog):
    with caplog.at_level("WARNING", logger="datasets.bases"):
        build_dataset(_cfg(market_root))  # pid 0 only in the gallery, as in the real Market-1501
    assert caplog.records == []


def test_unreadable_image_is_listed(market_root):
    bad = os.path.join(market_root, "market1501", "query", "0008_c1s1_000099_00.jpg")
    with open(bad, "wb") as handle:
        handle.write(b"\xff\xd8 this is not a jpeg")
    splits = build_dataset(_cfg(market_root))
    with pytest.raises(DatasetError, match=r"(?s)1 unreadable image.*0008_c1s1_000099_00\.jpg"):
        verify_images(splits.query)


def test_truncated_image_with_intact_header_is_listed(market_root):
    # A download cut off mid-file: the header parses (PIL's verify() passes), the scan does not.
    good = os.path.join(market_root, "market1501", "query", "0003_c1s1_000010_00.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 64, 3), np.uint8)).save(good)
    with open(good, "rb") as handle:
        data = handle.read()
    with open(good, "wb") as handle:
        handle.write(data[:len(data) * 3 // 5])
    with Image.open(good) as img:
        img.verify()  # the old header-only check would let this file through
    splits = build_dataset(_cfg(market_root))
    with pytest.raises(DatasetError, match=r"(?s)1 unreadable image.*0003_c1s1_000010_00\.jpg.*truncated"):
        verify_images(splits.query)


def test_only_test_checks_the_test_images_but_not_the_train_images(market_root):
    from datasets.datamodule import ReIDDataModule

    bad = os.path.join(market_root, "market1501", "bounding_box_train", "0007_c2s1_000001_00.jpg")
    with open(bad, "wb") as handle:
        handle.write(b"not an image")
    with pytest.raises(DatasetError, match=r"0007_c2s1_000001_00\.jpg"):
        ReIDDataModule(_cfg(market_root))
    only_test = load_config(opts=["DATASETS.NAMES", "market1501", "DATASETS.ROOT_DIR", market_root,
                                  "TEST.ONLY_TEST", "True", "MODEL.PRETRAIN_PATH", "model.ckpt"])
    assert ReIDDataModule(only_test).num_query == 2  # the train images are never read
    os.rename(bad, os.path.join(os.path.dirname(bad), "unparseable_name.jpg"))
    assert ReIDDataModule(only_test).splits.train == []  # nor is the train folder listed
    bad_query = os.path.join(market_root, "market1501", "query", "0003_c1s1_000010_00.jpg")
    with open(bad_query, "wb") as handle:
        handle.write(b"not an image")
    with pytest.raises(DatasetError, match=r"0003_c1s1_000010_00\.jpg"):
        ReIDDataModule(only_test)


def test_cuhk03p1_loads_with_reid_folder():
    splits = build_dataset(_cfg(CUHK03P1, "reid_folder"))
    assert (len(splits.train), len(splits.query), len(splits.gallery)) == (7239, 451, 487)
    assert splits.num_train_pids == 743
    assert {r.camid for r in splits.query} == {0} and {r.camid for r in splits.gallery} == {1}
    assert {r.pid for r in splits.query} == {r.pid for r in splits.gallery}
    assert sorted({r.pid for r in splits.train}) == list(range(743))


def _reid_folder(root, query_cams, gallery_cams, train_ids=4):
    """reid_folder layout: train ids 1..train_ids (2 cameras x 2 images); query pids 1, 2 and
    gallery pids 1, 2 (one image each, cameras as given) plus a distractor."""
    _touch_images(os.path.join(root, "bounding_box_train"),
                  [f"{pid:04d}_c{cam}s1_{pid * 10 + cam * 2 + i:06d}_00.jpg"
                   for pid in range(1, train_ids + 1) for cam in (1, 2) for i in range(2)])
    _touch_images(os.path.join(root, "query"),
                  [f"{pid:04d}_c{cam}s1_{100 + pid:06d}_00.jpg" for pid, cam in zip((1, 2), query_cams)])
    _touch_images(os.path.join(root, "bounding_box_test"),
                  [f"{pid:04d}_c{cam}s1_{200 + pid:06d}_00.jpg" for pid, cam in zip((1, 2), gallery_cams)]
                  + ["0000_c3s1_000300_00.jpg"])
    return root


def _datamodule(root, *opts):
    from datasets.datamodule import ReIDDataModule

    cfg = load_config(opts=["DATASETS.NAMES", "reid_folder", "DATASETS.ROOT_DIR", root,
                            "SOLVER.IMS_PER_BATCH", "2", *opts])
    return ReIDDataModule(cfg)


def test_data_without_camera_ids_fails_at_start_up_naming_the_rule(tmp_path):
    # Every query shares its camera with its only gallery match: the protocol removes those, so
    # no query could be scored. This used to surface only at the first evaluation, after training.
    root = _reid_folder(str(tmp_path), query_cams=(1, 1), gallery_cams=(1, 1))
    with pytest.raises(DatasetError, match=r"none of the 2 queries has a gallery image of its identity "
                                           r"from another camera.*KEEP_CAMID_CENTROIDS False"):
        _datamodule(root)
    _datamodule(root, "MODEL.KEEP_CAMID_CENTROIDS", "False")  # fashion protocol: nothing removed


def test_queries_without_a_match_are_counted_in_a_warning(tmp_path, caplog):
    root = _reid_folder(str(tmp_path), query_cams=(1, 1), gallery_cams=(2, 1))  # pid 2: same camera
    with caplog.at_level("WARNING"):
        _datamodule(root)
    assert "1 of 2 queries have no true match in the gallery from another camera" in caplog.text


@pytest.mark.parametrize("camera_aware", [True, False])
def test_count_valid_queries_matches_a_brute_force_count(camera_aware):
    from datasets.bases import ImageRecord
    from datasets.datamodule import count_valid_queries

    rng = np.random.default_rng(3)

    def records(n):
        return [ImageRecord(f"{i}.jpg", int(p), int(c))
                for i, (p, c) in enumerate(zip(rng.integers(0, 8, n), rng.integers(0, 3, n)))]
    query, gallery = records(60), records(25)
    brute = sum(any(g.pid == q.pid and not (camera_aware and g.camid == q.camid) for g in gallery)
                for q in query)
    assert count_valid_queries(query, gallery, camera_aware=camera_aware) == brute


def test_too_few_identities_for_p_fail_at_start_up(tmp_path):
    root = _reid_folder(str(tmp_path), query_cams=(1, 1), gallery_cams=(2, 2), train_ids=3)
    with pytest.raises(DatasetError, match=r"needs at least P x world size = 4 x 1 identities.*has 3"):
        _datamodule(root, "SOLVER.IMS_PER_BATCH", "4")
    _datamodule(root, "SOLVER.IMS_PER_BATCH", "4", "TEST.ONLY_TEST", "True",  # no training: no sampler
                "MODEL.PRETRAIN_PATH", "unused.ckpt")


def test_single_image_identities_are_warned_about(tmp_path, caplog):
    # The PK sampler skips them: they used to be classes that no batch ever held, without a word.
    root = _reid_folder(str(tmp_path), query_cams=(1, 1), gallery_cams=(2, 2))
    _touch_images(tmp_path / "bounding_box_train", ["0007_c1s1_000900_00.jpg", "0008_c2s1_000901_00.jpg"])
    with caplog.at_level("WARNING"):
        datamodule = _datamodule(root)
        datamodule.warn_about_small_identities()
    assert datamodule.num_classes == 6
    assert ("2 of 6 training identities have a single image: the PK sampler never puts them in a batch"
            in caplog.text)
    caplog.clear()
    with caplog.at_level("WARNING"):
        _datamodule(_reid_folder(str(tmp_path / "plain"), query_cams=(1, 1), gallery_cams=(2, 2))
                    ).warn_about_small_identities()
    assert "single image" not in caplog.text


def test_a_k_above_most_identities_image_counts_is_warned_about(tmp_path, caplog):
    root = _reid_folder(str(tmp_path), query_cams=(1, 1), gallery_cams=(2, 2))  # 4 train ids x 4 images
    for k, resampling, mocks, expected in ((4, "True", "copy", None), (6, "True", "copy", "resampled images"),
                                           (6, "False", "copy", "masked copies of their images"),
                                           (6, "False", "zeros", "masked mock images")):
        caplog.clear()
        with caplog.at_level("WARNING"):
            _datamodule(root, "DATALOADER.NUM_INSTANCE", str(k), "DATALOADER.USE_RESAMPLING", resampling,
                        "DATALOADER.MOCK_IMAGES", mocks).warn_about_small_identities()
        if expected is None:
            assert "NUM_INSTANCE" not in caplog.text
        else:
            assert f"NUM_INSTANCE {k}: 4 of 4 training identities have fewer images (median 4)" in caplog.text
            assert expected in caplog.text


# ------------------------------------------------------------------------- image modes
def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 32).reshape(64, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode.startswith("I")  # what PIL makes of a 16-bit grey PNG
    pixels = np.asarray(read_image(str(tmp_path / "grey16.png")))
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert pixels.shape == (64, 32, 3)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], expected)  # PIL's convert: 255 from value 255 on


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent (black-red underneath)
    rgba[2, 0, 3] = 128
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))).astype(int)
    assert (out[:2] == [200, 0, 0]).all() and (out[3] == [255, 255, 255]).all()
    # half transparent: the mean of red-ish and white
    assert np.abs(out[2, 0] - np.array([200 * 128 + 255 * 127, 255 * 127, 255 * 127]) / 255).max() <= 1
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).tolist() == [[[255, 255, 255], [40, 50, 60]]]


def test_colour_key_transparency_becomes_white_through_read_image(tmp_path):
    # PNG tRNS on an RGB or grey image: PIL keeps it in info["transparency"] and its conversion
    # ignores it; read_image (training, evaluation and inference all read through it) paints it white.
    rgb = np.array([[[10, 20, 30], [10, 20, 31]], [[0, 0, 0], [10, 20, 30]]], np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png", transparency=(10, 20, 30))
    grey = np.array([[7, 8], [0, 7]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png", transparency=7)
    grey16 = np.array([[7, 257 * 8], [257 * 100, 7]], np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png", transparency=7)
    for name, mode in (("rgb.png", "RGB"), ("grey.png", "L"), ("grey16.png", "I;16")):
        with Image.open(tmp_path / name) as img:
            assert img.mode == mode and "transparency" in img.info  # what PIL makes of these files
    white = [255, 255, 255]
    assert np.asarray(read_image(str(tmp_path / "rgb.png"))).tolist() == [[white, [10, 20, 31]], [[0, 0, 0], white]]
    assert np.asarray(read_image(str(tmp_path / "grey.png"))).tolist() == [[white, [8, 8, 8]], [[0, 0, 0], white]]
    # 16-bit: the key matches stored values, scaling to 8 bits happens as for opaque images
    assert np.asarray(read_image(str(tmp_path / "grey16.png"))).tolist() == [[white, [8, 8, 8]],
                                                                              [[100, 100, 100], white]]


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK", "P", "YCbCr"])
def test_opaque_images_convert_as_pil_does(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB").convert(mode)
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def _image_folder(root):
    """image_folder layout with nested, hidden, empty and loose entries; returns the root."""
    _touch_images(os.path.join(root, "train", "bob"), ["2.jpg", "1.JPG"])
    _touch_images(os.path.join(root, "train", "alice", "day 2"), ["a.png"])
    _touch_images(os.path.join(root, "train", "alice"), ["b.jpg"])
    _touch_images(os.path.join(root, "train", ".cache"), ["x.jpg"])
    os.makedirs(os.path.join(root, "train", "nobody"))
    _touch_images(os.path.join(root, "query", "carol"), ["q.jpg"])
    _touch_images(os.path.join(root, "query", "bob"), ["q.jpg"])
    _touch_images(os.path.join(root, "gallery", "dave"), ["g.jpg"])
    _touch_images(os.path.join(root, "gallery", "bob"), ["g1.jpg", "g2.jpg"])
    _touch_images(os.path.join(root, "gallery"), ["street.jpg"])
    _touch_images(os.path.join(root, "gallery", "dave", "raw"), ["g.tif"])  # a format not read
    return root


def test_image_folder_names_identities_by_folder(tmp_path, caplog):
    root = _image_folder(str(tmp_path))
    with caplog.at_level("WARNING"):
        splits = build_dataset(_cfg(root, "image_folder"))

    def rows(records):
        return [(os.path.relpath(r.path, root), r.pid, r.camid) for r in records]
    # train: sorted names -> 0..N-1, images anywhere below the identity's folder, hidden ones skipped
    assert rows(splits.train) == [(os.path.join("train", "alice", "b.jpg"), 0, 0),
                                  (os.path.join("train", "alice", "day 2", "a.png"), 0, 0),
                                  (os.path.join("train", "bob", "1.JPG"), 1, 0),
                                  (os.path.join("train", "bob", "2.jpg"), 1, 0)]
    assert "1 identity folder(s) in" in caplog.text and "'nobody'" in caplog.text
    assert "Left 1 image file(s) out of the gallery split" in caplog.text and ".tif (1)" in caplog.text
    # query and gallery share one numbering from 1 (bob, carol, dave); a loose gallery image is pid 0
    assert rows(splits.query) == [(os.path.join("query", "bob", "q.jpg"), 1, 0),
                                  (os.path.join("query", "carol", "q.jpg"), 2, 0)]
    assert rows(splits.gallery) == [(os.path.join("gallery", "bob", "g1.jpg"), 1, 1),
                                    (os.path.join("gallery", "bob", "g2.jpg"), 1, 1),
                                    (os.path.join("gallery", "dave", "g.jpg"), 3, 1),
                                    (os.path.join("gallery", "street.jpg"), 0, 1)]


def test_image_folder_protocol_removes_nothing(tmp_path):
    """No camera ids: query camera 0, gallery camera 1, so the camera-aware protocol keeps every
    gallery image and agrees with the fashion protocol, in both modes."""
    from datasets.datamodule import count_valid_queries
    from utils.eval_reid import evaluate
    splits = build_dataset(_cfg(_image_folder(str(tmp_path)), "image_folder"))
    for camera_aware in (True, False):
        assert count_valid_queries(splits.query, splits.gallery, camera_aware=camera_aware) == 1  # bob
    rng = np.random.default_rng(0)
    q_feats, g_feats = rng.standard_normal((2, 4)), rng.standard_normal((4, 4))
    labels = ([r.pid for r in splits.query], [r.pid for r in splits.gallery],
              [r.camid for r in splits.query], [r.camid for r in splits.gallery])
    for use_centroids in (False, True):
        aware = evaluate(q_feats, g_feats, *labels, use_centroids=use_centroids, camera_aware=True)
        unaware = evaluate(q_feats, g_feats, *labels, use_centroids=use_centroids, camera_aware=False)
        assert aware["mAP"] == unaware["mAP"] and list(aware["cmc"]) == list(unaware["cmc"])


def test_image_folder_lists_each_image_once_through_linked_folders(tmp_path):
    """os.walk follows links but not loops: a link back up an identity's tree listed its images again
    at every level (40 copies, until the kernel's ELOOP); two such links never ended."""
    root = _image_folder(str(tmp_path))
    os.symlink(".", os.path.join(root, "gallery", "bob", "again"))
    os.symlink("..", os.path.join(root, "query", "carol", "up"))  # up to query/: carol's and bob's images
    _touch_images(os.path.join(root, "elsewhere"), ["e.jpg"])
    os.symlink(os.path.join(root, "elsewhere"), os.path.join(root, "gallery", "dave", "linked"))
    splits = build_dataset(_cfg(root, "image_folder"))
    gallery = [os.path.relpath(r.path, root) for r in splits.gallery]
    assert gallery == [os.path.join("gallery", "bob", "g1.jpg"), os.path.join("gallery", "bob", "g2.jpg"),
                       os.path.join("gallery", "dave", "g.jpg"), os.path.join("gallery", "dave", "linked", "e.jpg"),
                       os.path.join("gallery", "street.jpg")]
    assert [os.path.relpath(r.path, root) for r in splits.query if r.pid == 2] == [
        os.path.join("query", "carol", "q.jpg"), os.path.join("query", "carol", "up", "bob", "q.jpg")]


def test_image_folder_query_without_its_identity_in_the_gallery_is_named(tmp_path, caplog):
    """A query folder named unlike any gallery folder ("Bob" vs "bob") is named with its file; the
    camera advice (which cannot help: image_folder gives query and gallery different cameras) is not given."""
    from datasets.datamodule import check_evaluable
    root = _image_folder(str(tmp_path))
    os.rename(os.path.join(root, "query", "bob"), os.path.join(root, "query", "Bob"))
    splits = build_dataset(_cfg(root, "image_folder"))
    with pytest.raises(DatasetError, match=r"none of the 2 queries has a gallery image of its identity \(e\.g\. "
                                           r".*query/Bob/q\.jpg: identity 1 has no gallery image\)\.$") as error:
        check_evaluable(splits, camera_aware=True)
    assert "camera" not in str(error.value)
    _touch_images(os.path.join(root, "gallery", "carol"), ["g.jpg"])
    with caplog.at_level("WARNING"):
        check_evaluable(build_dataset(_cfg(root, "image_folder")), camera_aware=True)
    assert re.search(r"1 of 2 queries have no true match in the gallery \(e\.g\. .*query/Bob/q\.jpg", caplog.text)


def test_image_folder_errors_name_the_file_or_folder(tmp_path):
    root = _image_folder(str(tmp_path))
    _touch_images(os.path.join(root, "query"), ["who.jpg"])
    with pytest.raises(DatasetError, match=r"who\.jpg lies directly in the query folder .*query/<identity>/<image>"):
        build_dataset(_cfg(root, "image_folder"))
    os.remove(os.path.join(root, "query", "who.jpg"))
    shutil.rmtree(os.path.join(root, "gallery"))
    with pytest.raises(DatasetError, match=r"Missing gallery folder: .*gallery"):
        build_dataset(_cfg(root, "image_folder"))
    shutil.rmtree(os.path.join(root, "train"))  # an evaluation needs no train folder
    _touch_images(os.path.join(root, "gallery", "bob"), ["g.jpg"])
    only_test = load_config(opts=["DATASETS.NAMES", "image_folder", "DATASETS.ROOT_DIR", root,
                                  "TEST.ONLY_TEST", "True", "MODEL.PRETRAIN_PATH", "unused.ckpt"])
    splits = build_dataset(only_test)
    assert splits.train == [] and len(splits.query) == 2
    with pytest.raises(DatasetError, match=r"Missing train folder"):
        build_dataset(_cfg(root, "image_folder"))


def _duke(root, *, with_train=True):
    base = os.path.join(root, "DukeMTMC-reID")
    if with_train:
        _touch_images(os.path.join(base, "bounding_box_train"), ["0005_c8_f0000001.jpg", "0009_c3_f0000002.jpg",
                                                                  "0005_c1_f0000003.jpg"])
    _touch_images(os.path.join(base, "query"), ["0011_c1_f0000010.jpg"])
    _touch_images(os.path.join(base, "bounding_box_test"), ["0011_c2_f0000020.jpg", "0012_c5_f0000021.jpg"])


def _records(splits, split):
    return [(os.path.basename(r.path), r.pid, r.camid) for r in getattr(splits, split)]


def test_several_datasets_train_on_their_union_and_test_on_one(market_root):
    _duke(market_root)
    market = build_dataset(_cfg(market_root))
    duke = build_dataset(_cfg(market_root, "dukemtmcreid"))
    both = build_dataset(_cfg(market_root, "market1501, dukemtmcreid"))
    # Market's identities 0..1 and cameras 0..5 first, then Duke's, moved past them: no identity or camera shared
    assert _records(duke, "train") == [("0005_c1_f0000003.jpg", 0, 0), ("0005_c8_f0000001.jpg", 0, 7),
                                       ("0009_c3_f0000002.jpg", 1, 2)]
    assert _records(both, "train") == _records(market, "train") + [
        ("0005_c1_f0000003.jpg", 2, 6), ("0005_c8_f0000001.jpg", 2, 13), ("0009_c3_f0000002.jpg", 3, 8)]
    assert both.num_train_pids == 4 and both.name == "market1501+dukemtmcreid (test: market1501)"
    assert (both.query, both.gallery) == (market.query, market.gallery)  # the first dataset is tested by default
    chosen = build_dataset(load_config(opts=["DATASETS.NAMES", "market1501,dukemtmcreid", "DATASETS.TEST_NAME",
                                             "dukemtmcreid", "DATASETS.ROOT_DIR", market_root]))
    assert chosen.train == both.train and (chosen.query, chosen.gallery) == (duke.query, duke.gallery)


def test_cross_domain_testing_reads_no_train_folder_of_the_test_dataset(market_root, tmp_path):
    _duke(market_root, with_train=False)
    opts = ["DATASETS.NAMES", "market1501", "DATASETS.TEST_NAME", "dukemtmcreid", "DATASETS.ROOT_DIR", market_root]
    splits = build_dataset(load_config(opts=opts))
    assert splits.train == build_dataset(_cfg(market_root)).train
    assert _records(splits, "query") == [("0011_c1_f0000010.jpg", 11, 0)]
    assert [name for name, _, _ in _records(splits, "gallery")] == ["0011_c2_f0000020.jpg", "0012_c5_f0000021.jpg"]
    only_test = build_dataset(load_config(opts=[*opts, "TEST.ONLY_TEST", "True", "MODEL.PRETRAIN_PATH", "x.ckpt"]))
    assert only_test.train == [] and only_test.query == splits.query  # only the test dataset is read
    shutil.rmtree(os.path.join(market_root, "market1501", "bounding_box_train"))
    with pytest.raises(DatasetError, match="bounding_box_train"):  # training still needs its own train folder
        build_dataset(load_config(opts=opts))


@pytest.mark.parametrize("names", ["market1501,market1501", "market1501,reid_folder", "street2shop,df1"])
def test_only_distinct_folder_datasets_combine(names):
    with pytest.raises(ConfigError, match=r"DATASETS.NAMES = .* distinct names among market1501, dukemtmcreid"):
        load_config(opts=["DATASETS.NAMES", names])


def _msmt(root, version="MSMT17_V1", folders=("train", "test")):
    """A small MSMT17 release: lists of '<pid>/<file> <pid>' lines (pids from 0), camera in the third field."""
    base = os.path.join(root, version)
    lists = {"train": [(0, 1), (0, 7), (4, 15)], "val": [(4, 2)], "query": [(0, 3), (2, 5)],
             "gallery": [(0, 4), (2, 6), (3, 1)]}
    for split, items in lists.items():
        image_dir = os.path.join(base, folders[0] if split in ("train", "val") else folders[1])
        lines = []
        for n, (pid, cam) in enumerate(items):
            relative = f"{pid:04d}/{pid:04d}_{n:03d}_{cam:02d}_0303morning_{n:04d}_0.jpg"
            _touch_images(os.path.dirname(os.path.join(image_dir, relative)), [os.path.basename(relative)])
            lines.append(f"{relative} {pid}\n")
        with open(os.path.join(base, f"list_{split}.txt"), "w") as handle:
            handle.writelines(lines)
    return base


@pytest.mark.parametrize("version,folders", [("MSMT17_V1", ("train", "test")),
                                             ("MSMT17_V2", ("mask_train_v2", "mask_test_v2"))])
def test_msmt17_reads_its_lists(tmp_path, version, folders):
    base = _msmt(str(tmp_path), version, folders)
    splits = build_dataset(_cfg(str(tmp_path), "msmt17"))
    train = [(os.path.relpath(r.path, base), r.pid, r.camid) for r in splits.train]
    assert train == [(f"{folders[0]}/0000/0000_000_01_0303morning_0000_0.jpg", 0, 0),
                     (f"{folders[0]}/0000/0000_001_07_0303morning_0001_0.jpg", 0, 6),
                     (f"{folders[0]}/0004/0004_002_15_0303morning_0002_0.jpg", 1, 14),
                     (f"{folders[0]}/0004/0004_000_02_0303morning_0000_0.jpg", 1, 1)]  # list_val joins train
    # query and gallery identities from 1: 0 is the distractor label
    assert [(r.pid, r.camid) for r in splits.query] == [(1, 2), (3, 4)]
    assert [(r.pid, r.camid) for r in splits.gallery] == [(1, 3), (3, 5), (4, 0)]
    assert all(os.path.isfile(r.path) for r in splits.train + splits.query + splits.gallery)
    assert splits.num_train_pids == 2


def test_msmt17_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DatasetError, match="neither .*MSMT17_V1 nor .*MSMT17_V2 exists"):
        build_dataset(_cfg(str(tmp_path), "msmt17"))
    base = _msmt(str(tmp_path))
    with open(os.path.join(base, "list_query.txt"), "a") as handle:
        handle.write("0009/0009_000_16_x_0000_0.jpg 9\n")
    with pytest.raises(DatasetError, match=r"list_query.txt, line 3: identity 9 or camera 16 out of range"):
        build_dataset(_cfg(str(tmp_path), "msmt17"))
    with open(os.path.join(base, "list_query.txt"), "w") as handle:
        handle.write("0000/0000_000_01_x.jpg 0\nno-pid-here\n")
    with pytest.raises(DatasetError, match=r"list_query.txt, line 2: cannot read 'no-pid-here'"):
        build_dataset(_cfg(str(tmp_path), "msmt17"))
    os.remove(os.path.join(base, "list_query.txt"))
    with pytest.raises(DatasetError, match="MSMT17 list file not found: .*list_query.txt"):
        build_dataset(_cfg(str(tmp_path), "msmt17"))


def test_msmt17_lists_with_a_byte_order_mark_and_crlf_read_the_same(tmp_path):
    base = _msmt(str(tmp_path))
    expected = build_dataset(_cfg(str(tmp_path), "msmt17"))
    for split in ("train", "query"):
        path = os.path.join(base, f"list_{split}.txt")
        with open(path) as handle:
            text = handle.read()
        with open(path, "wb") as handle:
            handle.write(b"\xef\xbb\xbf" + text.replace("\n", " \r\n").encode())
    assert build_dataset(_cfg(str(tmp_path), "msmt17")) == expected


def test_msmt17_only_test_reads_no_train_list(tmp_path):
    base = _msmt(str(tmp_path))
    os.remove(os.path.join(base, "list_train.txt"))
    cfg = load_config(opts=["DATASETS.NAMES", "msmt17", "DATASETS.ROOT_DIR", str(tmp_path), "TEST.ONLY_TEST", "True",
                            "MODEL.PRETRAIN_PATH", "x.ckpt"])
    splits = build_dataset(cfg)
    assert splits.train == [] and len(splits.query) == 2 and len(splits.gallery) == 3


def test_dataset_names_read_the_same_with_spaces_and_a_trailing_comma():
    from datasets import dataset_names, test_dataset_name
    from utils.run import output_dir_of

    for names, expected in (("market1501,", ["market1501"]), (" market1501 , dukemtmcreid ,", ["market1501", "dukemtmcreid"])):
        cfg = load_config(opts=["DATASETS.NAMES", names, "DATASETS.TEST_NAME", " dukemtmcreid ", "OUTPUT_DIR", ""])
        assert dataset_names(cfg) == expected and test_dataset_name(cfg) == "dukemtmcreid"
        assert output_dir_of(cfg) == os.path.join("logs", "+".join(expected))
