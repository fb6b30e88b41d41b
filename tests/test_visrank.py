"""Tests of utils/visrank.py: ranked-list PNGs, their borders, index.html, CMC plot."""
import re

import numpy as np
import pytest
from PIL import Image

from utils.eval_reid import evaluate
from utils.visrank import (BORDER, GAP, MATCH, NON_MATCH, QUERY_GAP, plot_cmc_curve,
                           visualize_ranked_results)

SIZE = (24, 12)  # (height, width) of each shown image, px
CELL_W = SIZE[1] + 2 * BORDER

# Query q0 (pid 1, cam 0) sits at x=0; the gallery at x = 1..6. q1 (pid 2) at x=10.
Q_FEATS = np.array([[0.0], [10.0]], np.float32)
G_FEATS = np.array([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]], np.float32)
Q_PIDS, Q_CAMIDS = [1, 2], [0, 0]
G_PIDS, G_CAMIDS = [3, 1, 2, 1, 0, 2], [1, 1, 1, 0, 1, 1]
COLOURS = [(10 * i, 100, 200) for i in range(6)]  # a distinct fill per gallery image


@pytest.fixture
def images(tmp_path):
    def save(name, colour):
        path = tmp_path / "images" / name
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 80), colour).save(path)
        return str(path)
    query = [save(f"q{i}.png", (0, 0, 0)) for i in range(2)]
    gallery = [save(f"g{i}.png", COLOURS[i]) for i in range(6)]
    return query, gallery


def _visualise(images, out_dir, **evaluate_args):
    query_paths, gallery_paths = images
    result = evaluate(Q_FEATS, G_FEATS, Q_PIDS, G_PIDS, Q_CAMIDS, G_CAMIDS,
                      feat_norm=False, return_topk=4, **evaluate_args)
    mode = "centroid" if evaluate_args.get("use_centroids") else "standard"
    return visualize_ranked_results(result, query_paths, gallery_paths, Q_PIDS, G_PIDS,
                                    Q_CAMIDS, G_CAMIDS, out_dir, topk=4, image_size=SIZE,
                                    mode_name=mode)


def cell_x(rank):
    """Left edge of the rank-th (0-based) gallery cell."""
    return CELL_W + QUERY_GAP + GAP + rank * (CELL_W + GAP)


def test_ranked_list_borders_mark_matches(images, tmp_path):
    written = _visualise(images, tmp_path)
    assert len(written) == 2
    picture = Image.open(written[0]).convert("RGB")
    # q0's filtered ranking: g0 (pid 3), g1 (pid 1, match), g2 (pid 2), g4 (pid 0);
    # g3 (pid 1, camera 0) is removed.
    assert picture.size == (cell_x(4) - GAP, SIZE[0] + 2 * BORDER)
    assert picture.getpixel((cell_x(0) + 1, 1)) == NON_MATCH
    assert picture.getpixel((cell_x(1) + 1, 1)) == MATCH
    assert picture.getpixel((cell_x(2) + 1, 1)) == NON_MATCH
    inside = [picture.getpixel((cell_x(r) + CELL_W // 2, SIZE[0] // 2)) for r in range(4)]
    assert inside == [COLOURS[0], COLOURS[1], COLOURS[2], COLOURS[4]]
    assert picture.getpixel((cell_x(0) - 1, 5)) == (255, 255, 255)  # the gap is blank


def test_centroid_mode_shows_an_image_of_each_centroid(images, tmp_path):
    for camera_aware in (True, False):
        written = _visualise(images, tmp_path / str(camera_aware), use_centroids=True,
                             camera_aware=camera_aware)
        picture = Image.open(written[0]).convert("RGB")
        # Items: centroids of pids 1 (x=3, or x=2 from camera 1 only), 2 (x=4.5), 3 (x=1)
        # and the distractor g4 (x=5). Pid 1 is shown by g1 (first by path; with camera
        # awareness also the only image from another camera than q0's).
        inside = [picture.getpixel((cell_x(r) + CELL_W // 2, SIZE[0] // 2)) for r in range(4)]
        assert inside == [COLOURS[0], COLOURS[1], COLOURS[2], COLOURS[4]]
        assert picture.getpixel((cell_x(1) + 1, 1)) == MATCH


def test_index_lists_every_png_of_every_mode(images, tmp_path):
    _visualise(images, tmp_path)
    _visualise(images, tmp_path, use_centroids=True)
    index = (tmp_path / "visrank" / "index.html").read_text()
    linked = set(re.findall(r"src='([^']+)'", index))
    on_disk = {p.relative_to(tmp_path / "visrank").as_posix()
               for p in (tmp_path / "visrank").rglob("*.png")}
    assert linked == on_disk and len(on_disk) == 4


def test_index_links_query_files_with_any_name(images, tmp_path):
    """A query file name with a space and a byte that is not UTF-8: the PNGs are written and
    index.html links each of them byte-exactly (percent-encoded) instead of crashing."""
    import os
    import urllib.parse
    query_paths, gallery_paths = images
    renamed = []
    for i, path in enumerate(query_paths):
        target = os.path.join(os.path.dirname(path), os.fsdecode(b"caf\xe9 %d.png" % i))
        os.rename(path, target)
        renamed.append(target)
    _visualise((renamed, gallery_paths), tmp_path)
    index = (tmp_path / "visrank" / "index.html").read_bytes().decode("utf-8")
    linked = {urllib.parse.unquote_to_bytes(src) for src in re.findall(r"src='([^']+)'", index)}
    on_disk = {os.fsencode(p.relative_to(tmp_path / "visrank").as_posix())
               for p in (tmp_path / "visrank").rglob("*.png")}
    assert linked == on_disk and len(on_disk) == 2 and all(b"caf\xe9" in name for name in on_disk)


def test_max_queries_and_missing_topk(images, tmp_path):
    query_paths, gallery_paths = images
    result = evaluate(Q_FEATS, G_FEATS, Q_PIDS, G_PIDS, Q_CAMIDS, G_CAMIDS, return_topk=2)
    written = visualize_ranked_results(result, query_paths, gallery_paths, Q_PIDS, G_PIDS,
                                       Q_CAMIDS, G_CAMIDS, tmp_path, topk=2, max_queries=1)
    assert len(written) == 1
    with pytest.raises(ValueError, match=r"return_topk=5"):
        visualize_ranked_results(result, query_paths, gallery_paths, Q_PIDS, G_PIDS,
                                 Q_CAMIDS, G_CAMIDS, tmp_path, topk=5)


def test_cmc_plot_is_a_png_with_both_curves(tmp_path):
    out = plot_cmc_curve({"standard": np.linspace(0.6, 1.0, 50),
                          "centroid": np.linspace(0.8, 1.0, 50)}, tmp_path / "cmc.png")
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.size == (640, 420)
    colours = {c for _, c in picture.convert("RGB").getcolors(maxcolors=100000)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours


def test_index_is_a_table_of_queries_by_mode_with_each_ap(images, tmp_path):
    """One row per query, standard then centroid; each cell names the query's AP from evaluate."""
    _visualise(images, tmp_path, use_centroids=True)
    _visualise(images, tmp_path)
    index = (tmp_path / "visrank" / "index.html").read_text()
    header = re.search(r"<tr><th>query</th>(.*?)</tr>", index, re.S).group(1)
    assert re.findall(r"<th>(\w+)<br>", header) == ["standard", "centroid"]
    rows = re.findall(r"<tr><td>([^<]+)<br><small>(pid \d+: [^<]+)</small></td>(.*?)</tr>", index, re.S)
    # each row: the picture's name, then the query's identity and its file (parent folder and name)
    assert [(name, query) for name, query, _ in rows] == [("00000_q0", "pid 1: images/q0.png"),
                                                          ("00001_q1", "pid 2: images/q1.png")]
    rows = [(name, cells) for name, _, cells in rows]
    for mode_column, use_centroids in ((0, False), (1, True)):
        result = evaluate(Q_FEATS, G_FEATS, Q_PIDS, G_PIDS, Q_CAMIDS, G_CAMIDS, feat_norm=False,
                          use_centroids=use_centroids)
        shown = [re.findall(r"AP ([0-9.]+)", cells)[mode_column] for _, cells in rows]
        assert [float(ap) for ap in shown] == pytest.approx(result["query_ap"], abs=5e-5)
    assert index.count("loading='lazy'") == 4


def test_pictures_of_an_earlier_evaluation_go(images, tmp_path):
    """A second evaluation of fewer queries leaves no picture of the first behind, and an index
    written for the modes of this evaluation leaves out a mode folder of an earlier one."""
    from utils.visrank import write_index
    query_paths, gallery_paths = images
    _visualise(images, tmp_path)
    _visualise(images, tmp_path, use_centroids=True)
    (tmp_path / "visrank" / "standard" / "notes.png").write_bytes(b"a user's file")
    result = evaluate(Q_FEATS, G_FEATS, Q_PIDS, G_PIDS, Q_CAMIDS, G_CAMIDS, return_topk=2)
    visualize_ranked_results(result, query_paths, gallery_paths, Q_PIDS, G_PIDS, Q_CAMIDS, G_CAMIDS,
                             tmp_path, topk=2, max_queries=1, mode_name="standard")
    left = sorted(p.name for p in (tmp_path / "visrank" / "standard").glob("*.png"))
    assert left == ["00000_q0.png", "notes.png"]
    write_index(tmp_path / "visrank", modes=["standard"])
    index = (tmp_path / "visrank" / "index.html").read_text()
    assert "centroid/" not in index and "standard/00000_q0.png" in index and "notes" not in index


def test_a_query_name_near_the_file_name_limit_is_shortened(images, tmp_path):
    """A query file name of 252 bytes (valid) plus the number prefix used to exceed the 255-byte
    limit and fail the evaluation with "File name too long"; it is cut to fit and still linked."""
    import os
    import urllib.parse
    query_paths, gallery_paths = images
    long_name = os.path.join(os.path.dirname(query_paths[0]), "é" * 124 + ".png")  # 252 bytes
    os.rename(query_paths[0], long_name)
    written = _visualise(([long_name, query_paths[1]], gallery_paths), tmp_path)
    assert all(path.is_file() and len(os.fsencode(path.name)) <= 255 for path in written)
    assert written[0].name.startswith("00000_éé")
    index = (tmp_path / "visrank" / "index.html").read_text()
    assert [urllib.parse.unquote(src) for src in re.findall(r"src='([^']+)'", index)] == [
        f"standard/{path.name}" for path in written]


def test_index_rows_follow_the_query_numbers_past_99999(tmp_path):
    from utils.visrank import write_index
    mode_dir = tmp_path / "visrank" / "standard"
    mode_dir.mkdir(parents=True)
    for name in ("99999_a.png", "100000_b.png", "00002_c.png"):
        Image.new("RGB", (2, 2)).save(mode_dir / name)
    write_index(tmp_path / "visrank")
    index = (tmp_path / "visrank" / "index.html").read_text()
    assert re.findall(r"<tr><td>([^<]+)</td>", index) == ["00002_c", "99999_a", "100000_b"]
