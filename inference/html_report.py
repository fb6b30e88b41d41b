"""A static HTML page of search results: each query beside its top-k gallery images and distances.

The page needs no server: images are referenced by their path relative to the HTML file (URL-
encoded), or, with ``thumbnails=True`` (or when no relative path exists, e.g. another drive), by
small JPEG copies in ``<out_dir>/thumbs/`` (those of earlier pages that this one does not show are
deleted). After loading, a short inline script marks every ``<img>`` with ``data-loaded="1"`` or
``"0"`` and sets ``data-images`` / ``data-broken`` on ``<body>``, so broken images stand out (red
frame) and a headless browser can check the page.
"""
from __future__ import annotations

import hashlib
import html
import os
import re
from dataclasses import dataclass, field
from typing import Collection, Sequence

from PIL import Image

from datasets.bases import to_rgb
from utils.io import atomic_write_text, url_path

THUMB_HEIGHT = 128  # pixels
THUMBS_DIR = "thumbs"  # <out_dir>/thumbs: the thumbnail copies; never inputs of the tools
_THUMB_NAME = re.compile(r"[0-9a-f]{20}\.jpg")  # what _Sources names a thumbnail: only these are ever deleted


@dataclass
class Match:
    label: str  # gallery image path, or identity name for a centroid gallery
    distance: float
    image: str | None = None  # image file to show; None shows the label in a box instead


@dataclass
class QueryRow:
    query: str  # query image path
    matches: list[Match] = field(default_factory=list)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; background: #fafafa; }}
.row {{ display: flex; align-items: flex-start; gap: 6px; padding: 6px 0; border-bottom: 1px solid #ddd; }}
figure {{ margin: 0; width: 96px; text-align: center; font-size: 11px; }}
figure.query {{ margin-right: 14px; background: #e8f0ff; }}
figure img {{ height: {height}px; max-width: 96px; object-fit: contain; display: block; margin: auto; }}
figcaption {{ overflow-wrap: anywhere; }}
.label {{ height: {height}px; display: flex; align-items: center; justify-content: center;
          border: 1px dashed #888; overflow-wrap: anywhere; }}
img[data-loaded="0"] {{ outline: 3px solid red; }}
</style>
</head>
<body data-images="" data-broken="">
<h1>{title}</h1>
<p>{subtitle}</p>
{rows}
<script>
window.addEventListener("load", function () {{
  var images = document.images, broken = 0;
  for (var i = 0; i < images.length; i++) {{
    var ok = images[i].complete && images[i].naturalWidth > 0;
    images[i].setAttribute("data-loaded", ok ? "1" : "0");
    if (!ok) broken++;
  }}
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken", String(broken));
}});
</script>
</body>
</html>
"""


class _Sources:
    """``src`` attribute for an image file, relative to the page or via a thumbnail copy."""

    def __init__(self, out_dir: str, thumbnails: bool, height: int):
        self.out_dir, self.thumbnails, self.height = os.path.abspath(out_dir), thumbnails, height
        self.cache: dict[str, str | None] = {}
        self.thumbnails_written: set[str] = set()  # file names in <out_dir>/thumbs

    def __call__(self, path: str) -> str | None:
        if path not in self.cache:
            self.cache[path] = self._thumbnail(path) if self.thumbnails else self._relative(path)
        return self.cache[path]

    def _relative(self, path: str) -> str | None:
        try:
            relative = os.path.relpath(os.path.abspath(path), self.out_dir)
        except ValueError:  # no relative path (another drive)
            return self._thumbnail(path)
        return url_path(relative)

    def _thumbnail(self, path: str) -> str | None:
        name = hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()[:20] + ".jpg"
        target = os.path.join(self.out_dir, THUMBS_DIR, name)
        try:
            with Image.open(path) as img:
                img = to_rgb(img)
                width = max(1, round(img.width * self.height / max(1, img.height)))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                img.resize((width, self.height)).save(target, quality=85)
        except (OSError, ValueError):
            return None  # unreadable: shown as a label
        self.thumbnails_written.add(name)
        return f"{THUMBS_DIR}/{name}"


def remove_stale_thumbnails(out_dir: str, keep: Collection[str] = ()) -> int:
    """Delete the thumbnails in ``<out_dir>/thumbs`` that are not in ``keep`` (file names), so that
    they do not pile up over runs; only regular files named as this module names them, nothing
    else (a linked folder is left alone). The folder goes too when it ends up empty. Returns the
    number of files deleted."""
    folder = os.path.join(out_dir, THUMBS_DIR)
    if os.path.islink(folder) or not os.path.isdir(folder):
        return 0
    removed = 0
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name not in keep and _THUMB_NAME.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            removed += 1
    if not os.listdir(folder):
        os.rmdir(folder)
    return removed


def _figure(src: str | None, caption: str, title: str, css_class: str = "") -> str:
    klass = f' class="{css_class}"' if css_class else ""
    if src is None:
        body = f'<div class="label">{html.escape(os.path.basename(title) or title)}</div>'
    else:
        body = f'<img src="{html.escape(src)}" alt="{html.escape(os.path.basename(title))}">'
    return (f'<figure{klass} title="{html.escape(title)}">{body}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_rows(rows: Sequence[QueryRow], sources: _Sources) -> str:
    parts = []
    for row in rows:
        cells = [_figure(sources(row.query), "query", row.query, "query")]
        for rank, match in enumerate(row.matches, 1):
            src = sources(match.image) if match.image else None
            cells.append(_figure(src, f"#{rank} {match.distance:.4f}", match.label))
        parts.append('<div class="row">' + "".join(cells) + "</div>")
    return "\n".join(parts)


def write_report(out_dir: str, rows: Sequence[QueryRow], *, title: str = "Query results", subtitle: str = "",
                 thumbnails: bool = False, height: int = THUMB_HEIGHT) -> str:
    """Write ``<out_dir>/index.html`` (atomically) and return its path; thumbnails of earlier pages
    that this one does not show are deleted."""
    sources = _Sources(out_dir, thumbnails, height)
    page = _PAGE.format(title=html.escape(title), subtitle=html.escape(subtitle), height=height,
                        rows=render_rows(rows, sources))
    path = os.path.join(out_dir, "index.html")
    atomic_write_text(path, page, errors="replace")  # links are percent-encoded; only names shown lose bytes
    remove_stale_thumbnails(out_dir, sources.thumbnails_written)
    return path
