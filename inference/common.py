"""What the inference tools share: a checkpoint -> model, image listing, batched embedding, outputs.

An image's embedding is ``ReIDModel.embed`` (the post-BN feature, or the pre-BN one with
``TEST.NECK_FEAT before``; averaged with its mirror image's with ``TEST.FLIP_FEATS``) of its test
transform, exactly what evaluation computes; nothing here normalises it.

Config precedence for inference: the defaults < ``--config_file`` < ``KEY VALUE`` pairs, except that
the model architecture always comes from the checkpoint, and its test-time settings
(``modelling.weights.TEST_TIME_KEYS``: INPUT.SIZE_TEST, PIXEL_MEAN, PIXEL_STD, SOLVER.DISTANCE_FUNC,
TEST.FEAT_NORM, TEST.NECK_FEAT, TEST.FLIP_FEATS) come from the checkpoint unless a ``KEY VALUE`` pair sets them (a config file does
not): without that, a model trained at 64x32 would silently be fed 256x128.

    embedder = Embedder("last.ckpt", cfg_overrides={"TEST.IMS_PER_BATCH": 64}, device="cpu")
    features = embedder.embed(["a.jpg", pil_image, uint8_array])  # (3, D) float32
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from config import ConfigError, load_config
from datasets import DatasetError
from datasets.bases import IMAGE_EXTENSIONS, to_rgb
from datasets.datamodule import default_num_workers, read_image
from datasets.gpu_augment import resolve_fast_path
from datasets.transforms import build_transforms
from inference.html_report import THUMBS_DIR
from modelling.baseline import ReIDModel
from modelling.weights import (WeightsError, checkpoint_config, describe_mismatch, explicit_keys,
                               load_project_checkpoint)
from utils.io import atomic_write_bytes, atomic_write_text
from utils.run import resolve_devices, setup_logging

log = logging.getLogger("centroids_reid.inference")

MAX_LISTED = 20  # skipped files named in one warning


class InferenceError(RuntimeError):
    """Bad input to an inference tool (missing folder, empty input, wrong gallery); names the path."""


# ----------------------------------------------------------------------------- config and model

def build_model(cfg, checkpoint: dict, path: str = "") -> ReIDModel:
    """A ReIDModel in eval mode holding the checkpoint's weights (any key mismatch is an error)."""
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model = ReIDModel(cfg, int(checkpoint["hyper_parameters"]["num_classes"]))
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise WeightsError(f"Checkpoint {path} does not fit a {cfg.MODEL.NAME} ReIDModel: {problem}")
    model.load_state_dict(state, strict=False)  # num_batches_tracked may be absent
    return model.eval()


def pick_device(cfg, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else a GPU when one is visible and GPU_IDS is non-empty, else the CPU."""
    if device is not None:
        return torch.device(device)
    accelerator, _ = resolve_devices(cfg)
    if accelerator == "gpu":
        return torch.device("cuda", cfg.GPU_IDS[0] if cfg.GPU_IDS else 0)
    return torch.device("cpu")


# ----------------------------------------------------------------------------- inputs

@dataclass
class ImageList:
    """Image files to embed, in order, and the files dropped while listing them (path, reason)."""
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    base: str = ""  # the folder given: identities (parent folders) are named relative to it


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(source: str, *, what: str = "DATASETS.ROOT_DIR", output_dir: str = "") -> ImageList:
    """Images of a folder (recursive, sorted), a single image, or a text file listing image paths
    (one per line, relative to the list file; blank lines and '#' comments ignored).

    Files under ``output_dir`` (real paths compared) are the tools' outputs, never inputs: a re-run with
    OUTPUT_DIR inside the image folder would embed the thumbnails of the last report. When ``source``
    itself lies in ``output_dir`` (e.g. the same folder), only ``output_dir/thumbs`` is skipped."""
    if not source or not os.path.exists(source):
        raise InferenceError(f"{what} {source!r} does not exist; give a folder, an image or a text file of paths.")
    source = os.path.abspath(source)
    outputs = _OutputFolders(source, output_dir)
    if os.path.isdir(source):
        found, skipped = [], []
        visited = {os.path.realpath(source)}
        for folder, dirs, files in os.walk(source, followlinks=True):  # linked folders count too ...
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            real = [os.path.realpath(os.path.join(folder, d)) for d in dirs]
            dirs[:] = [d for d, r in zip(dirs, real) if r not in visited and not outputs.skip_folder(r)]
            visited.update(real)  # ... once: no link cycles
            for name in files:
                if name.startswith("."):
                    continue
                path = os.path.join(folder, name)
                if not outputs.skip_file(path):
                    (found if _is_image_name(name) else skipped).append(path)
        images = ImageList(sorted(found), [(p, "not an image file (extension)") for p in sorted(skipped)], source)
    elif _is_image_name(source):
        images = ImageList([p for p in [source] if not outputs.skip_file(p)], [])
    else:
        images = _read_list_file(source)
        images.paths = [p for p in images.paths if not outputs.skip_file(p)]
    outputs.log()
    bad_names = {p for p in images.paths if "\n" in p or "\r" in p}
    if bad_names:  # paths.txt holds one path per line
        images.paths = [p for p in images.paths if p not in bad_names]
        images.skipped += [(p, "line break in the file name") for p in sorted(bad_names)]
    if not images.paths:
        raise InferenceError(f"{what} {source} holds no image files ({len(images.skipped)} other files"
                             f"{outputs.describe()}).")
    return images


class _OutputFolders:
    """The folders whose files list_images skips as outputs of the tools, and how many it skipped."""

    def __init__(self, source: str, output_dir: str):
        self.folders: list[tuple[str, str, str]] = []  # (real path, path as given, why)
        self.counts: dict[str, int] = {}
        if not output_dir:
            return
        output_real = os.path.realpath(output_dir)
        thumbs = os.path.join(output_dir, THUMBS_DIR)
        self.folders.append((os.path.join(output_real, THUMBS_DIR), thumbs,
                             "thumbnails written by get_similar --html_thumbs, never inputs"))
        if not _is_within(os.path.realpath(source), output_real):  # the images were not asked for in OUTPUT_DIR
            self.folders.append((output_real, f"OUTPUT_DIR {output_dir}",
                                 "outputs of the inference tools are never inputs"))

    def _match(self, real: str) -> str | None:
        return next((shown for folder, shown, _ in self.folders if _is_within(real, folder)), None)

    def skip_folder(self, real: str) -> bool:
        shown = self._match(real)
        if shown is not None:
            self.counts[shown] = self.counts.get(shown, 0) + sum(
                1 for _, _, names in os.walk(real) for name in names if not name.startswith("."))
        return shown is not None

    def skip_file(self, path: str) -> bool:
        shown = self._match(os.path.realpath(path))
        if shown is not None:
            self.counts[shown] = self.counts.get(shown, 0) + 1
        return shown is not None

    def log(self) -> None:
        for _, shown, why in self.folders:
            if self.counts.get(shown):
                log.warning("Skipped %d files under %s: %s.", self.counts[shown], shown, why)

    def describe(self) -> str:
        return "".join(f"; {count} skipped under {shown}" for shown, count in self.counts.items() if count)


def _is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _read_list_file(path: str) -> ImageList:
    base = os.path.dirname(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not part of a path
            lines = [line.strip() for line in handle]
    except UnicodeDecodeError as err:
        raise InferenceError(f"{path} is neither an image (by its extension) nor a UTF-8 text file of "
                             f"image paths: {err}") from err
    paths, skipped = [], []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        full = os.path.normpath(os.path.join(base, line))
        (paths if os.path.isfile(full) else skipped).append(full)
    return ImageList(paths, [(p, "file not found") for p in skipped])


def identity_of(path: str, base: str, *, top: bool = False) -> str | None:
    """The identity of an image: its parent folder, relative to the input folder ``base`` ('/'-separated),
    or the parent folder's name when no folder was given; None for an image directly in ``base``.
    top: the folder directly under ``base`` that holds the image at any depth instead (as
    ``DATASETS.NAMES image_folder`` and torchvision's ImageFolder name classes); needs a ``base``."""
    parent = os.path.dirname(path)
    if not base:
        if top:
            raise InferenceError("Identities from the top-level folders need DATASETS.ROOT_DIR to be a folder, "
                                 "not a list of files.")
        return os.path.basename(parent) or None
    relative = os.path.relpath(parent, base)
    if relative == "." or relative.startswith(".."):
        return None
    parts = relative.split(os.sep)
    return parts[0] if top else "/".join(parts)


def warn_skipped(skipped: Sequence[tuple[str, str]], what: str = "files") -> None:
    if not skipped:
        return
    shown = "\n  ".join(f"{path}: {reason}" for path, reason in skipped[:MAX_LISTED])
    more = f"\n  ... and {len(skipped) - MAX_LISTED} more" if len(skipped) > MAX_LISTED else ""
    log.warning("Skipped %d %s:\n  %s%s", len(skipped), what, shown, more)


# ----------------------------------------------------------------------------- embedding

class _ImageFiles(Dataset):
    """``(index, image tensor or None, error message)`` per file; a bad file never stops the run."""

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(read_image(self.paths[index])), ""
        except DatasetError as err:
            return index, None, str(err)
        except Exception as err:  # a transform that cannot handle this image
            return index, None, f"Cannot transform image {self.paths[index]}: {type(err).__name__}: {err}"


def _collate(items):
    good = [(i, image) for i, image, _ in items if image is not None]
    failed = [(i, error) for i, image, error in items if image is None]
    images = torch.stack([image for _, image in good]) if good else None
    return [i for i, _ in good], images, failed


class Embedder:
    """Post-BN embeddings from a checkpoint of this project (a FeatureExtractor-style API).

    Args:
        checkpoint_path: a .ckpt written by the trainers (empty: take MODEL.PRETRAIN_PATH from the config).
        cfg_overrides: ``{"KEY": value}`` or ``["KEY", "VALUE", ...]`` applied over ``config_file``.
        device: "cpu", "cuda", "cuda:1", ...; None picks a GPU when one is visible and GPU_IDS is set.
        config_file: optional YAML file of overrides.
    """

    def __init__(self, checkpoint_path: str = "", cfg_overrides: Mapping | Sequence[str] | None = None,
                 device: str | torch.device | None = None, *, config_file: str = ""):
        opts = _as_opts(cfg_overrides)
        if checkpoint_path:
            opts += ["MODEL.PRETRAIN_PATH", checkpoint_path]
        user_cfg = load_config(config_file or None, opts)
        self.checkpoint_path = user_cfg.MODEL.PRETRAIN_PATH
        checkpoint = load_project_checkpoint(self.checkpoint_path)
        self.cfg = checkpoint_config(checkpoint, user_cfg, explicit_keys(opts), self.checkpoint_path)
        self.device = pick_device(self.cfg, device)
        self.model = build_model(self.cfg, checkpoint, self.checkpoint_path).to(self.device)
        del checkpoint
        self.feat_dim = self.model.feat_dim
        self.transform = build_transforms(self.cfg, is_train=False)
        self.batch_size = self.cfg.TEST.IMS_PER_BATCH
        self.amp_dtype = None
        if self.device.type == "cuda" and self.cfg.USE_MIXED_PRECISION:
            self.amp_dtype = torch.bfloat16 if self.cfg.MIXED_PRECISION_DTYPE == "bf16" else torch.float16
        # MODEL.CHANNELS_LAST as in training ("auto": on a GPU), where convolutions run faster in it.
        self.channels_last = resolve_fast_path(self.cfg, use_gpu=self.device.type == "cuda").channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def embed_tensor(self, images: torch.Tensor) -> np.ndarray:
        """Preprocessed images (B, 3, H, W) -> (B, D) float32 embeddings (one forward pass)."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            return self.model.embed(images).float().cpu().numpy()

    def preprocess(self, item) -> torch.Tensor:
        """One image -> a preprocessed (3, H, W) float tensor at INPUT.SIZE_TEST. Images (test transform:
        resize, scale, normalise): a path, a PIL image, a uint8 array (H, W), (H, W, 1), (H, W, 3) or
        (H, W, 4), a uint8 tensor (1|3|4, H, W) as torchvision.io.read_image returns; grey is replicated
        to RGB, transparency composited on white (as for files). A float tensor (3, H, W) is taken as
        already preprocessed."""
        if isinstance(item, torch.Tensor):
            if item.dtype == torch.uint8:
                if item.dim() != 3 or item.shape[0] not in (1, 3, 4):
                    raise ValueError(f"expected a uint8 image tensor (3, H, W) (or 1 / 4 channels), got shape "
                                     f"{tuple(item.shape)}")
                return self._array_to_tensor(item.permute(1, 2, 0).cpu().numpy())
            return self._checked_preprocessed(item)
        if isinstance(item, (str, os.PathLike)):
            return self.transform(read_image(_existing_file(item)))
        if isinstance(item, Image.Image):
            return self.transform(to_rgb(item))
        if isinstance(item, np.ndarray):
            return self._array_to_tensor(item)
        raise TypeError(f"cannot embed a {type(item).__name__}: give paths, PIL images, uint8 arrays or tensors")

    def _array_to_tensor(self, array: np.ndarray) -> torch.Tensor:
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]  # PIL has no (H, W, 1) mode
        channels = 1 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
        if array.dtype != np.uint8 or channels not in (1, 3, 4) or 0 in array.shape:
            raise ValueError(f"expected a uint8 image array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) (RGBA), got "
                             f"{array.dtype} {array.shape}")
        return self.transform(to_rgb(Image.fromarray(np.ascontiguousarray(array))))

    def _checked_preprocessed(self, images: torch.Tensor) -> torch.Tensor:
        """A float (3, H, W) tensor at INPUT.SIZE_TEST, as float32; any other shape would be embedded at
        the wrong resolution (or fail deep in the model), so it is refused."""
        size = [int(x) for x in self.cfg.INPUT.SIZE_TEST]
        if not images.is_floating_point() or list(images.shape) != [3, *size]:
            raise ValueError(f"a preprocessed tensor must be float (3, H, W) at INPUT.SIZE_TEST = {size}, normalised "
                             f"with INPUT.PIXEL_MEAN / PIXEL_STD; got {images.dtype} {tuple(images.shape)}. Give "
                             "images as paths, PIL images or uint8 arrays / tensors to have them resized.")
        return images.float()

    def embed(self, inputs) -> np.ndarray:
        """Paths, PIL images, uint8 arrays (H, W[, 1|3|4]), uint8 tensors (3, H, W) or preprocessed float
        tensors (3, H, W) at INPUT.SIZE_TEST (one or a list; or a (B, 3, H, W) tensor) -> (N, D) float32
        embeddings, post-BN unless TEST.NECK_FEAT is before (see ``preprocess``). A missing or unreadable file raises DatasetError."""
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
            items: list = list(inputs)
        elif isinstance(inputs, (list, tuple)):
            items = list(inputs)
        else:
            items = [inputs]
        for item in items:  # a missing file fails before any embedding work, not after the batches before it
            if isinstance(item, (str, os.PathLike)):
                _existing_file(item)
        chunks = [np.zeros((0, self.feat_dim), np.float32)]
        for start in range(0, len(items), self.batch_size):
            batch = torch.stack([self.preprocess(x) for x in items[start:start + self.batch_size]])
            chunks.append(self.embed_tensor(batch))
        return np.concatenate(chunks)

    def embed_files(self, paths: Sequence[str], *, progress: bool = True, num_workers: int | None = None
                    ) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
        """Embed image files through a DataLoader. Returns (features (M, D) float32, the indices into
        ``paths`` of the M readable files in order, [(path, why)] of the files that could not be read)."""
        from tqdm import tqdm

        if num_workers is not None:
            workers = num_workers
        elif self.cfg.DATALOADER.NUM_WORKERS < 0 and self.device.type == "cuda":
            # On a GPU, JPEG decoding is the bottleneck: every CPU but the one feeding the GPU decodes.
            workers = max(1, (os.cpu_count() or 2) - 1)
        else:
            workers = default_num_workers(self.cfg)
        workers = min(workers, max(0, len(paths) // self.batch_size))  # no idle processes for tiny inputs
        loader = DataLoader(_ImageFiles(paths, self.transform), batch_size=self.batch_size, shuffle=False,
                            num_workers=workers, collate_fn=_collate,
                            pin_memory=self.device.type == "cuda" and self.cfg.DATALOADER.PIN_MEMORY)
        chunks, kept, failed = [np.zeros((0, self.feat_dim), np.float32)], [], []
        bar = tqdm(loader, desc="embedding", unit="batch", disable=not progress, file=sys.stderr)
        for indices, images, errors in bar:
            if images is not None:
                chunks.append(self.embed_tensor(images))
                kept.extend(indices)
            failed.extend((paths[i], message) for i, message in errors)
        return np.concatenate(chunks), kept, failed


def _existing_file(path: str | os.PathLike) -> str:
    """``path`` as a str; DatasetError naming it when it does not exist (read_image would say it
    "disappeared after the dataset was indexed", which only fits a dataset)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        if os.path.islink(path):
            raise DatasetError(f"image file {path} is a broken symbolic link (to {os.readlink(path)}, which does "
                               "not exist)")
        raise DatasetError(f"image file not found: {path}")
    return path


def _as_opts(overrides: Mapping | Sequence[str] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [item for key, value in overrides.items()
                for item in (key, value if isinstance(value, str) else repr(value))]
    return [str(item) for item in overrides]


def centroids(features: np.ndarray, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Mean embedding per label: (sorted unique labels, (L, D) float32 means in that order)."""
    names = sorted(set(labels))
    column = {name: i for i, name in enumerate(names)}
    groups = torch.tensor([column[label] for label in labels], dtype=torch.long)
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).double()
    sums = torch.zeros(len(names), feats.shape[1], dtype=torch.float64).index_add_(0, groups, feats)
    counts = torch.bincount(groups, minlength=len(names)).clamp(min=1).double()
    return names, (sums / counts[:, None]).float().numpy()


# ----------------------------------------------------------------------------- outputs

def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` output of a non-object array (loadable with allow_pickle=False)."""
    if array.dtype == object:
        raise TypeError("refusing to save an object array: it would need pickle to load")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def save_npy(path: str, array: np.ndarray) -> None:
    atomic_write_bytes(path, npy_bytes(array))


def save_npz(path: str, **arrays: np.ndarray) -> None:
    for name, array in arrays.items():
        if array.dtype == object:
            raise TypeError(f"refusing to save object array {name!r}: it would need pickle to load")
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def save_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", errors="backslashreplace")


def save_lines(path: str, lines: Sequence[str]) -> None:
    atomic_write_text(path, "".join(f"{line}\n" for line in lines), errors="surrogateescape")


def require_output_dir(cfg) -> str:
    if not cfg.OUTPUT_DIR:
        raise InferenceError("OUTPUT_DIR is empty; give a folder for the results, e.g. OUTPUT_DIR outputs/embeddings.")
    try:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    except OSError as err:
        raise InferenceError(f"OUTPUT_DIR {cfg.OUTPUT_DIR} cannot be created: {err}") from err
    return cfg.OUTPUT_DIR


def parse_tool_args(parser, argv: Sequence[str] | None):
    """``parser.parse_args``, except that the tool's ``--flags`` may also follow the KEY VALUE pairs
    (argparse would read them as pairs)."""
    args = parser.parse_args(argv)
    pairs, flags, tokens = [], [], list(args.opts)
    while tokens:
        token = tokens.pop(0)
        if token.startswith("--") and len(pairs) % 2 == 0:  # where a KEY would be
            flags.append(token)
            action = parser._option_string_actions.get(token.split("=", 1)[0])
            if action is not None and action.nargs != 0 and "=" not in token and tokens:
                flags.append(tokens.pop(0))
        else:
            pairs.append(token)
    if flags:
        late = parser.parse_args(flags)
        for name, value in vars(late).items():
            if name != "opts" and value != parser.get_default(name):
                setattr(args, name, value)
    args.opts = pairs
    return args


def run_cli(body: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None) -> int:
    """Run a tool's body: 0 on success, 2 (with the message logged) on a user error."""
    if not logging.getLogger().handlers:  # leave a host's logging (pytest, a notebook) alone
        setup_logging()
    try:
        body(argv)
    except (ConfigError, DatasetError, WeightsError, InferenceError) as err:
        log.error("%s", err)
        return 2
    return 0
