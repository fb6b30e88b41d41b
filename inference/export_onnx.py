"""Export the embedding model (preprocessed image -> the embedding that evaluation uses: post-BN, or
pre-BN with TEST.NECK_FEAT before; mirror-averaged with TEST.FLIP_FEATS) of a checkpoint to ONNX.

    python inference/export_onnx.py --config_file=configs/256_resnet50.yml \
        MODEL.PRETRAIN_PATH logs/market1501/256_resnet50/run_0/checkpoints/best.ckpt OUTPUT_DIR outputs/onnx [--opset 17]

The graph takes ``images`` float32 (B, 3, H, W) with H, W = INPUT.SIZE_TEST, normalised with
INPUT.PIXEL_MEAN / PIXEL_STD, and returns ``embeddings`` float32 (B, D); B is dynamic. Before
anything is written, onnxruntime must match PyTorch on random inputs of two batch sizes within
``--atol`` (default 1e-4, fp32). Writes ``OUTPUT_DIR/model.onnx`` and ``model.json`` (shapes,
preprocessing, parity); ``--name other.onnx`` writes ``other.onnx`` and ``other.json``.
Exit codes: 0 exported and verified, 1 parity check failed, 2 bad input.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from config import build_arg_parser  # noqa: E402
from inference.common import (Embedder, InferenceError, parse_tool_args, require_output_dir, run_cli,  # noqa: E402
                              save_json)
from utils.io import atomic_write_bytes  # noqa: E402

log = logging.getLogger("centroids_reid.inference")

PARITY_BATCH_SIZES = (1, 3)


class ParityError(RuntimeError):
    """onnxruntime's output differs from PyTorch's beyond the tolerance."""


class EmbeddingNet(nn.Module):
    """``ReIDModel.embed`` as a module's forward, for tracing."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)


def export_bytes(model: nn.Module, height: int, width: int, opset: int) -> bytes:
    """The ONNX model (bytes) of ``EmbeddingNet(model)`` with a dynamic batch axis."""
    net = EmbeddingNet(model).eval().cpu()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(net, (torch.zeros(2, 3, height, width),), buffer, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["embeddings"],
                          dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
    return buffer.getvalue()


def check_parity(onnx_bytes: bytes, model: nn.Module, height: int, width: int, *, atol: float,
                 batch_sizes: Sequence[int] = PARITY_BATCH_SIZES, seed: int = 0) -> dict[int, float]:
    """Max abs difference per batch size between onnxruntime and PyTorch (fp32, CPU) on random
    inputs; raises ParityError when one exceeds ``atol``."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load_from_string(onnx_bytes))
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    net = EmbeddingNet(model).eval().cpu()
    differences = {}
    for batch in batch_sizes:
        images = torch.randn(batch, 3, height, width, generator=generator)
        with torch.inference_mode():
            expected = net(images).numpy()
        got = session.run(["embeddings"], {"images": images.numpy()})[0]
        if got.shape != expected.shape:
            raise ParityError(f"onnxruntime returned shape {got.shape} for batch {batch}, PyTorch {expected.shape}.")
        differences[batch] = float(np.max(np.abs(got - expected)))
    worst = max(differences.values())
    if not worst < atol:
        raise ParityError(f"onnxruntime differs from PyTorch by up to {worst:.3g} (tolerance {atol:g}; per batch "
                          f"size: {differences}); the ONNX model was not written.")
    return differences


def build_parser():
    parser = build_arg_parser("Export a checkpoint's embedding model to ONNX and verify it with onnxruntime.")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed |onnxruntime - PyTorch|")
    parser.add_argument("--name", default="model.onnx",
                        help="file name inside OUTPUT_DIR, ending in .onnx (the metadata goes beside it as .json)")
    return parser


def check_name(name: str) -> None:
    """``--name`` must be a plain file name ending in .onnx: the metadata file is the same name with
    .json, so "model.json" would overwrite the model with it."""
    stem, extension = os.path.splitext(name)
    has_folder = os.path.basename(name) != name or bool(os.altsep and os.altsep in name)
    if has_folder or not stem or extension.lower() != ".onnx":
        raise InferenceError(f"--name must be a file name ending in .onnx (written inside OUTPUT_DIR), got {name!r}; "
                             "e.g. --name model.onnx (give the folder as OUTPUT_DIR).")


def export_onnx(argv: Sequence[str] | None) -> None:
    args = parse_tool_args(build_parser(), argv)
    check_name(args.name)
    embedder = Embedder("", args.opts, device="cpu", config_file=args.config_file)
    cfg = embedder.cfg
    out_dir = require_output_dir(cfg)
    height, width = cfg.INPUT.SIZE_TEST
    try:
        onnx_bytes = export_bytes(embedder.model, height, width, args.opset)
    except Exception as err:  # the exporter's errors (unsupported opset or operator) vary
        raise InferenceError(f"ONNX export of {embedder.checkpoint_path} (opset {args.opset}) failed: "
                             f"{type(err).__name__}: {err}") from err
    try:
        differences = check_parity(onnx_bytes, embedder.model, height, width, atol=args.atol)
    except ParityError:
        raise
    except Exception as err:  # onnx's checker or onnxruntime refused the model (e.g. an opset too old for it)
        raise InferenceError(f"The ONNX model of {embedder.checkpoint_path} (opset {args.opset}) does not load in "
                             f"onnxruntime: {type(err).__name__}: {err}") from err
    path = os.path.join(out_dir, args.name)
    atomic_write_bytes(path, onnx_bytes)
    save_json(os.path.splitext(path)[0] + ".json", {
        "onnx": args.name, "checkpoint": os.path.abspath(embedder.checkpoint_path), "model": cfg.MODEL.NAME,
        "opset": args.opset,
        "input": {"name": "images", "shape": ["batch", 3, height, width], "dtype": "float32",
                  "pixel_mean": list(cfg.INPUT.PIXEL_MEAN), "pixel_std": list(cfg.INPUT.PIXEL_STD),
                  "note": "RGB scaled to 0..1, then (x - mean) / std"},
        "output": {"name": "embeddings", "shape": ["batch", embedder.feat_dim], "normalized": False},
        "parity_max_abs_diff": {str(b): d for b, d in differences.items()}, "atol": args.atol,
    })
    log.info("Exported %s (opset %d); onnxruntime matches PyTorch within %.2g (batch sizes %s).", path,
             args.opset, max(differences.values()), ", ".join(map(str, differences)))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run_cli(export_onnx, argv)
    except ParityError as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
