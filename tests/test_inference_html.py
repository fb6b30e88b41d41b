"""get_similar.py --html: the static page, loaded from disk by headless Chromium, shows every image.

Chromium is required (Debian package ``chromium``): without it these tests fail, they never skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_opts

from config import cfg_to_dict, load_config
from inference import create_embeddings, get_similar
from inference.html_report import Match, QueryRow, write_report
from modelling.ctl_model import CTLModel

# Names a page must URL-encode: a space, '#', '%', and non-ASCII letters.
GALLERY = ["alice/1.jpg", "alice/2 #x.jpg", "bob/ü 3.jpg", "bob/4%.jpg", "carol/5.jpg"]
QUERIES = ["q1.jpg", "q 2.jpg"]


def chromium_dom(page: str, tmp_path) -> str:
    """The page's DOM after load, as headless Chromium renders it from file://."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium); the HTML report cannot be checked")
    done = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", "--dump-dom",
         "file://" + os.path.abspath(page)],
        capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and "<body" in done.stdout, done.stderr[-2000:]
    return done.stdout


def image_status(dom: str) -> tuple[dict[str, str], list[str]]:
    """(the <body> attributes, each <img>'s data-loaded value in page order)."""
    body = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom).group(1)))
    loaded = [re.search(r'data-loaded="(\d)"', tag).group(1) if "data-loaded" in tag else "missing"
              for tag in re.findall(r"<img\b[^>]*>", dom)]
    return body, loaded


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A hand-made (untrained) checkpoint of this project and small query/gallery folders of JPEGs."""
    base = tmp_path_factory.mktemp("html")
    cfg = load_config(None, tiny_opts(str(base), str(base / "train")))
    torch.manual_seed(0)
    module = CTLModel(cfg=cfg_to_dict(cfg), num_classes=3)
    checkpoint = str(base / "model.ckpt")
    torch.save({"state_dict": module.state_dict(),
                "hyper_parameters": {"cfg": cfg_to_dict(cfg), "num_classes": 3, "seed": 0, "model_type": "ctl"}},
               checkpoint)
    rng = np.random.default_rng(5)
    for relative in [f"gallery/{p}" for p in GALLERY] + [f"query/{p}" for p in QUERIES]:
        path = base / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.repeat(rng.integers(0, 256, (8, 1, 3), dtype=np.uint8), 4, axis=0).repeat(32, axis=1)
        Image.fromarray(pixels).save(path, quality=90)
    return base, checkpoint


def opts(checkpoint: str, root, out, *extra: str) -> list[str]:
    return ["MODEL.PRETRAIN_PATH", checkpoint, "DATASETS.ROOT_DIR", str(root), "OUTPUT_DIR", str(out),
            "GPU_IDS", "[]", "DATALOADER.NUM_WORKERS", "0", "--no-progress", *extra]


def test_every_image_of_the_report_loads_in_chromium(setup, tmp_path):
    base, checkpoint = setup
    assert create_embeddings.main(opts(checkpoint, base / "gallery", tmp_path / "gallery")) == 0
    out = tmp_path / "results"
    argv = opts(checkpoint, base / "query", out, "--gallery_data", str(tmp_path / "gallery"), "--topk", "5",
                "--html")
    assert get_similar.main(argv) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "%20" in page and "%23" in page and "%C3%BC" in page and "%25" in page  # URL-encoded names
    results = json.load(open(out / "results.json"))
    for query in results["queries"]:
        for match in query["results"]:
            assert f"#{match['rank']} {match['distance']:.4f}" in page

    body, loaded = image_status(chromium_dom(str(out / "index.html"), tmp_path))
    assert body["data-images"] == str(len(QUERIES) * (1 + 5)) and body["data-broken"] == "0"
    assert loaded == ["1"] * len(QUERIES) * (1 + 5)


def test_centroid_report_shows_a_member_image_per_identity_via_thumbnails(setup, tmp_path):
    base, checkpoint = setup
    gallery = tmp_path / "centroids"
    argv = opts(checkpoint, base / "gallery", gallery, "MODEL.USE_CENTROIDS", "True", "--images-in-subfolders")
    assert create_embeddings.main(argv) == 0
    out = tmp_path / "results"
    argv = opts(checkpoint, base / "query", out, "--gallery_data", str(gallery), "--topk", "2", "--html",
                "--html-thumbs")
    assert get_similar.main(argv) == 0
    results = json.load(open(out / "results.json"))
    assert {m["identity"] for q in results["queries"] for m in q["results"]} <= {"alice", "bob", "carol"}
    thumbs = os.listdir(out / "thumbs")
    assert thumbs and all(name.endswith(".jpg") for name in thumbs)
    body, loaded = image_status(chromium_dom(str(out / "index.html"), tmp_path))
    assert body["data-images"] == str(len(QUERIES) * (1 + 2)) and body["data-broken"] == "0"
    assert loaded == ["1"] * len(QUERIES) * (1 + 2)


def test_the_page_reports_a_broken_image(setup, tmp_path):
    """The check above can fail: a missing file is counted, and an identity without images is a label."""
    base, _ = setup
    rows = [QueryRow(str(base / "query" / "q1.jpg"), [Match("gone.jpg", 0.5, str(tmp_path / "gone.jpg")),
                                                      Match("dave", 0.7, None)])]
    page = write_report(str(tmp_path / "report"), rows)
    body, loaded = image_status(chromium_dom(page, tmp_path))
    assert body["data-images"] == "2" and body["data-broken"] == "1" and loaded == ["1", "0"]
    assert '<div class="label">dave</div>' in open(page, encoding="utf-8").read()
