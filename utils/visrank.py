"""Pictures of evaluation results, drawn with PIL only: ranked lists and CMC curves."""
import html
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datasets.bases import to_rgb
from utils.io import atomic_write_text, url_path

BORDER, GAP, QUERY_GAP = 3, 2, 8  # px: cell border, gap between cells, extra after the query
MATCH, NON_MATCH, QUERY = (0, 170, 0), (220, 0, 0), (0, 0, 0)
LINE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _bordered(path, colour, image_size):
    """The image at `path` resized to image_size (height, width) inside a coloured border."""
    height, width = image_size
    with Image.open(path) as source:
        image = to_rgb(source).resize((width, height))
    cell = Image.new("RGB", (width + 2 * BORDER, height + 2 * BORDER), colour)
    cell.paste(image, (BORDER, BORDER))
    return cell


def _representative_paths(result, gallery_paths, g_pids, g_camids):
    """A function (item, query pid, query camera) -> the gallery image shown for an item.

    A centroid is shown by the first (by path) gallery image of its identity; for the
    query's own identity in camera-aware mode, the first image from another camera, i.e.
    one that really went into that centroid.
    """
    item_pids = result["gallery_item_pids"]
    is_centroid = result["gallery_item_is_centroid"]
    representative = result["gallery_item_representative"]
    camera_aware = result.get("camera_aware", True)
    images_by_pid = {}
    for index in np.argsort(np.asarray(gallery_paths, dtype=str), kind="stable"):
        images_by_pid.setdefault(int(g_pids[index]), []).append(int(index))

    def path_of(item, q_pid, q_camid):
        if not is_centroid[item]:
            return gallery_paths[representative[item]]
        images = images_by_pid[int(item_pids[item])]
        if camera_aware and item_pids[item] == q_pid:
            images = [i for i in images if g_camids[i] != q_camid] or images
        return gallery_paths[images[0]]
    return path_of


_PNG_NAME = re.compile(r"\d{5,}_.*\.png", re.S)  # what visualize_ranked_results names a query's picture
_MAX_NAME_BYTES = 255  # a file name's limit on the usual file systems (NAME_MAX)
_AP_FILE = "query_ap.json"  # per mode folder: {png name: {"ap": AP or null when skipped, "pid", "query"}}
_MODE_ORDER = {"standard": 0, "centroid": 1}  # then the others, by name


def _png_name(number, query_path):
    """``NNNNN_<query stem>.png``, the stem shortened to keep the name within _MAX_NAME_BYTES: the number
    alone keeps names apart, and a long query name would otherwise fail the evaluation."""
    prefix, stem = f"{number:05d}_", Path(query_path).stem
    while len(os.fsencode(f"{prefix}{stem}.png")) > _MAX_NAME_BYTES:
        stem = stem[:-1]
    return f"{prefix}{stem}.png"


def write_index(visrank_dir, modes=None):
    """(Re)write visrank_dir/index.html: a table with one row per query and one column per mode
    (`modes`, default every mode folder; standard, centroid, then the rest by name), each cell the
    query's ranked-list PNG and its AP, and each mode's mAP over the queries shown."""
    visrank_dir = Path(visrank_dir)
    if modes is None:
        modes = [p.name for p in visrank_dir.iterdir() if p.is_dir()]
    modes = sorted(modes, key=lambda m: (_MODE_ORDER.get(m, len(_MODE_ORDER)), m))
    pngs, aps = {}, {}
    for mode in modes:
        mode_dir = visrank_dir / mode
        found = mode_dir.glob("*.png") if mode_dir.is_dir() else ()
        pngs[mode] = {p.name for p in found if _PNG_NAME.fullmatch(p.name)}
        try:
            aps[mode] = json.loads((mode_dir / _AP_FILE).read_bytes().decode("utf-8", "surrogateescape"))
        except (OSError, ValueError):  # pictures of an older version, or the file is gone
            aps[mode] = {}
    # in query order: by number, as text 100000_ would come before 99999_
    rows = sorted(set().union(*pngs.values()), key=lambda name: (int(name.split("_", 1)[0]), name))

    def ap_text(mode, name):
        ap = aps[mode].get(name, {}).get("ap")
        return "AP &mdash; (no true match)" if ap is None else f"AP {ap:.4f}"

    def query_text(name):
        """The query's identity and file (parent folder and name): with one folder per identity, the
        file names alone (1.jpg, 2.jpg, ...) would not tell the rows apart."""
        entry = next((aps[mode][name] for mode in modes if name in aps[mode]), {})
        if "pid" not in entry:
            return ""
        return f"<br><small>pid {entry['pid']}: {html.escape(entry.get('query', ''))}</small>"

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Ranked results</title>",
             "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}"
             "img{display:block}</style></head><body><h1>Ranked results</h1>",
             f"<p>{len(rows)} queries. Each picture: the query (black), then its best-ranked gallery "
             "items, green for a true match, red otherwise; a centroid is shown by one of its images."
             "</p><table><tr><th>query</th>"]
    for mode in modes:
        shown = [entry["ap"] for name, entry in aps[mode].items()
                 if name in pngs[mode] and entry.get("ap") is not None]
        mean = f"mAP {np.mean(shown):.4f} over the {len(shown)} queries shown" if shown else ""
        parts.append(f"<th>{html.escape(mode)}<br><small>{mean}</small></th>")
    parts.append("</tr>")
    for name in rows:
        parts.append(f"<tr><td>{html.escape(Path(name).stem)}{query_text(name)}</td>")
        for mode in modes:
            if name not in pngs[mode]:
                parts.append("<td>&mdash;</td>")
                continue
            link = html.escape(url_path(f"{mode}/{name}"))
            parts.append(f"<td>{ap_text(mode, name)}<img src='{link}' loading='lazy' alt=''></td>")
        parts.append("</tr>")
    parts.append("</table></body></html>")
    # Links are percent-encoded; a name shown that is not UTF-8 loses its odd bytes ("?").
    atomic_write_text(str(visrank_dir / "index.html"), "\n".join(parts), errors="replace")


def visualize_ranked_results(result, query_paths, gallery_paths, q_pids, g_pids, q_camids,
                             g_camids, out_dir, *, topk=10, max_queries=100,
                             image_size=(256, 128), mode_name="standard", update_index=True):
    """Write one PNG per query: the query, then its top-k gallery items (removed items are
    never shown), bordered green for a true match and red otherwise.

    result: from `evaluate(..., return_topk=k)` with k >= topk (standard or centroid mode).
    query_paths (Q,), gallery_paths (G,): image files; q_pids, q_camids (Q,), g_pids,
    g_camids (G,): labels as given to `evaluate`. image_size: (height, width) in px.
    Files go to out_dir/visrank/<mode_name>/<query number>_<query file name>.png (those of an
    earlier call go first), with the queries' APs in <mode_name>/query_ap.json, and
    out_dir/visrank/index.html is rewritten to list all modes (unless ``update_index`` is False: a
    caller drawing several modes writes the index once, with `write_index`). Returns the PNG paths.
    """
    if "topk_indices" not in result or result["topk_indices"].shape[1] < topk:
        raise ValueError(f"the result holds no top-{topk} lists: call "
                         f"evaluate(..., return_topk={topk}) first")
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    path_of = _representative_paths(result, gallery_paths, g_pids, g_camids)
    mode_dir = Path(out_dir) / "visrank" / mode_name
    mode_dir.mkdir(parents=True, exist_ok=True)
    for stale in mode_dir.glob("*.png"):  # pictures of an earlier evaluation (other queries, or more)
        if _PNG_NAME.fullmatch(stale.name) and stale.is_file() and not stale.is_symlink():
            stale.unlink()
    query_ap = result.get("query_ap")
    aps = {}
    cell_w, cell_h = image_size[1] + 2 * BORDER, image_size[0] + 2 * BORDER
    written = []
    for q in range(min(len(query_paths), max_queries)):
        items = [int(i) for i in result["topk_indices"][q][:topk] if i >= 0]
        canvas = Image.new("RGB", (cell_w + QUERY_GAP + len(items) * (cell_w + GAP), cell_h),
                           (255, 255, 255))
        canvas.paste(_bordered(query_paths[q], QUERY, image_size), (0, 0))
        for rank, item in enumerate(items):
            is_match = result["gallery_item_pids"][item] == q_pids[q]
            cell = _bordered(path_of(item, q_pids[q], q_camids[q]),
                             MATCH if is_match else NON_MATCH, image_size)
            canvas.paste(cell, (cell_w + QUERY_GAP + GAP + rank * (cell_w + GAP), 0))
        out_path = mode_dir / _png_name(q, query_paths[q])
        canvas.save(out_path)
        written.append(out_path)
        ap = None if query_ap is None else float(query_ap[q])
        query = Path(query_paths[q])
        aps[out_path.name] = {"ap": ap if ap is not None and np.isfinite(ap) else None, "pid": int(q_pids[q]),
                              "query": f"{query.parent.name}/{query.name}"}
    # surrogateescape: a file name that is not UTF-8 keeps its bytes, as the PNG's name does
    atomic_write_text(str(mode_dir / _AP_FILE), json.dumps(aps, ensure_ascii=False), errors="surrogateescape")
    if update_index:
        write_index(mode_dir.parent)
    return written


def plot_cmc_curve(cmc_by_mode, out_path, *, title="CMC curve", size=(640, 420)):
    """Draw CMC curves (rank 1..len(cmc) on x, matching rate 0..1 on y) to a PNG.

    cmc_by_mode: {mode name: 1-D array of CMC values in [0, 1]}.
    """
    font = ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 60, 20, 40, 50
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    max_rank = max(len(np.asarray(c)) for c in cmc_by_mode.values())

    def to_px(rank, value):
        x = left + (rank - 1) / max(max_rank - 1, 1) * (width - left - right)
        return x, top + (1.0 - value) * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for value in np.linspace(0, 1, 6):
        x, y = to_px(1, value)
        draw.line([(x - 5, y), (x, y)], fill=(0, 0, 0))
        draw.line([(x + 1, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((x - 40, y - 6), f"{value:.1f}", fill=(0, 0, 0), font=font)
    step = 5 if max_rank <= 20 else 10
    for rank in sorted({1, *range(step, max_rank + 1, step), max_rank}):
        x, y = to_px(rank, 0.0)
        draw.line([(x, y), (x, y + 5)], fill=(0, 0, 0))
        draw.text((x - 6, y + 8), str(rank), fill=(0, 0, 0), font=font)
    draw.text((width / 2 - 15, height - 20), "rank", fill=(0, 0, 0), font=font)
    draw.text((width / 2 - 3 * len(title), 12), title, fill=(0, 0, 0), font=font)
    draw.text((8, top - 20), "matching rate", fill=(0, 0, 0), font=font)
    for i, (name, cmc) in enumerate(cmc_by_mode.items()):
        colour = LINE_COLOURS[i % len(LINE_COLOURS)]
        points = [to_px(r + 1, float(v)) for r, v in enumerate(np.asarray(cmc))]
        draw.line(points if len(points) > 1 else points * 2, fill=colour, width=2)
        legend_y = height - bottom - 20 - 16 * i  # legend in the lower right, inside the axes
        draw.line([(width - right - 150, legend_y), (width - right - 125, legend_y)],
                  fill=colour, width=2)
        draw.text((width - right - 118, legend_y - 6), name, fill=(0, 0, 0), font=font)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path, format="PNG")
    return Path(out_path)
