"""Pictures of evaluation results, drawn with PIL only: ranked lists and CMC curves."""
import html
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


def write_index(visrank_dir):
    """(Re)write visrank_dir/index.html listing every PNG of every mode folder."""
    visrank_dir = Path(visrank_dir)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Ranked results</title>"
             "</head><body><h1>Ranked results</h1>"]
    for mode_dir in sorted(p for p in visrank_dir.iterdir() if p.is_dir()):
        parts.append(f"<h2>{html.escape(mode_dir.name)}</h2>")
        for png in sorted(mode_dir.glob("*.png")):
            link = html.escape(url_path(f"{mode_dir.name}/{png.name}"))
            parts.append(f"<div><p>{html.escape(png.stem)}</p><img src='{link}'></div>")
    parts.append("</body></html>")
    # Links are percent-encoded; a name shown that is not UTF-8 loses its odd bytes ("?").
    atomic_write_text(str(visrank_dir / "index.html"), "\n".join(parts), errors="replace")


def visualize_ranked_results(result, query_paths, gallery_paths, q_pids, g_pids, q_camids,
                             g_camids, out_dir, *, topk=10, max_queries=100,
                             image_size=(256, 128), mode_name="standard"):
    """Write one PNG per query: the query, then its top-k gallery items (removed items are
    never shown), bordered green for a true match and red otherwise.

    result: from `evaluate(..., return_topk=k)` with k >= topk (standard or centroid mode).
    query_paths (Q,), gallery_paths (G,): image files; q_pids, q_camids (Q,), g_pids,
    g_camids (G,): labels as given to `evaluate`. image_size: (height, width) in px.
    Files go to out_dir/visrank/<mode_name>/<query number>_<query file name>.png, and
    out_dir/visrank/index.html is rewritten to list all modes. Returns the PNG paths.
    """
    if "topk_indices" not in result or result["topk_indices"].shape[1] < topk:
        raise ValueError(f"the result holds no top-{topk} lists: call "
                         f"evaluate(..., return_topk={topk}) first")
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    path_of = _representative_paths(result, gallery_paths, g_pids, g_camids)
    mode_dir = Path(out_dir) / "visrank" / mode_name
    mode_dir.mkdir(parents=True, exist_ok=True)
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
        out_path = mode_dir / f"{q:05d}_{Path(query_paths[q]).stem}.png"
        canvas.save(out_path)
        written.append(out_path)
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
