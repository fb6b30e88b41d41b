"""Throughput of create_embeddings.py: images/s from JPEG files to embeddings.npy.

    python benchmarks/bench_embed.py                              # CPU, resnet18 and resnet50 at 256x128
    python benchmarks/bench_embed.py --device cuda --images 2000  # on a GPU machine (bf16 autocast)

Generates ``--images`` JPEGs of 128x64 (Market-1501's size; resized to INPUT.SIZE_TEST by the test
transform) and an untrained checkpoint per model (weights do not change the speed), then times
``create_embeddings.main`` in this process: "end to end" covers loading the checkpoint, listing,
decoding, the forward passes and writing the outputs (not the Python start-up, and on a GPU not
the process's one-off CUDA start-up: a run over two batches comes first); "embed" is a
second pass of ``Embedder.embed_files`` alone. "Latency" is the forward pass alone, per ``--latency-batches``
size: ``Embedder.embed_tensor`` on preprocessed images in host memory (so a GPU's copies in and out count), the
median call after two warm-up calls, over at least three calls and one second; reported in ms per batch and per
image (peers publish ms/image at batch 1 and 64). Prints tables and writes JSON (``--out``, alias ``--json``).
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import machine_info, sync, write_report  # noqa: E402
from config import cfg_to_dict, load_config  # noqa: E402
from inference import create_embeddings  # noqa: E402
from inference.common import Embedder, list_images  # noqa: E402
from modelling.backbones import BACKBONES  # noqa: E402
from modelling.ctl_model import CTLModel  # noqa: E402


def write_jpegs(folder: str, count: int, seed: int = 0) -> None:
    """Smooth random 128x64 pictures with noise (decode cost close to real crops)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)).resize((64, 128), Image.BILINEAR)
        pixels = np.asarray(coarse, np.int16) + rng.integers(-12, 13, (128, 64, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def write_checkpoint(path: str, model_name: str, size: list[int]) -> None:
    opts = ["MODEL.NAME", model_name, "MODEL.BACKBONE_EMB_SIZE", str(BACKBONES[model_name].feat_dim),
            "MODEL.PRETRAINED", "False", "INPUT.SIZE_TEST", str(list(size)), "INPUT.SIZE_TRAIN", str(list(size))]
    cfg = cfg_to_dict(load_config(None, opts))
    torch.manual_seed(0)
    module = CTLModel(cfg=cfg, num_classes=751)
    torch.save({"state_dict": module.state_dict(),
                "hyper_parameters": {"cfg": cfg, "num_classes": 751, "seed": 0, "model_type": "ctl"}}, path)


def forward_latency(embedder: Embedder, size: list[int], batch: int, *, min_calls: int = 3,
                    min_seconds: float = 1.0) -> dict:
    """Median seconds of one ``embed_tensor`` call on ``batch`` preprocessed images (see the module docstring)."""
    generator = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, *size, generator=generator)
    for _ in range(2):
        embedder.embed_tensor(images)  # returns host numpy: each call ends when its result is on the host
    times: list[float] = []
    while len(times) < min_calls or sum(times) < min_seconds:
        start = time.perf_counter()
        embedder.embed_tensor(images)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"batch": batch, "calls": len(times), "ms_per_batch": 1000 * seconds, "ms_per_image": 1000 * seconds / batch}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--models", nargs="*", default=["resnet18", "resnet50"], choices=sorted(BACKBONES))
    parser.add_argument("--size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=64, help="TEST.IMS_PER_BATCH")
    parser.add_argument("--workers", type=int, default=-1, help="DATALOADER.NUM_WORKERS (-1 = auto)")
    parser.add_argument("--latency-batches", type=int, nargs="*", default=[1, 64], metavar="B",
                        help="batch sizes of the forward-latency rows (none: skip them)")
    parser.add_argument("--work-dir", default="", help="where images and checkpoints go (default: a temp folder)")
    parser.add_argument("--out", "--json", dest="out", default=os.path.join(ROOT, "outputs", "bench_embed.json"),
                        help="JSON report")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible")

    work = args.work_dir
    if not work:
        work = tempfile.mkdtemp(prefix="bench_embed_")
        atexit.register(shutil.rmtree, work, ignore_errors=True)  # images and outputs: nothing the report needs
    images = os.path.join(work, "images")
    write_jpegs(images, args.images)
    device_opts = ["GPU_IDS", "[0]"] if args.device == "cuda" else ["GPU_IDS", "[]", "ACCELERATOR", "cpu"]
    rows = []
    for model_name in args.models:
        checkpoint = os.path.join(work, f"{model_name}.ckpt")
        write_checkpoint(checkpoint, model_name, args.size)
        opts = ["MODEL.PRETRAIN_PATH", checkpoint, "DATASETS.ROOT_DIR", images, "OUTPUT_DIR",
                os.path.join(work, f"out_{model_name}"), "TEST.IMS_PER_BATCH", str(args.batch),
                "DATALOADER.NUM_WORKERS", str(args.workers), *device_opts]
        if args.device == "cuda":  # the process's one-off CUDA / cuDNN start-up is not create_embeddings' cost
            warm = os.path.join(work, "warm_up")
            write_jpegs(warm, 2 * args.batch, seed=1)
            warm_opts = ["DATASETS.ROOT_DIR", warm, "OUTPUT_DIR", os.path.join(work, f"warm_{model_name}")]
            assert create_embeddings.main([*opts, *warm_opts, "--no-progress"]) == 0
        start = time.perf_counter()
        assert create_embeddings.main([*opts, "--no-progress"]) == 0
        end_to_end = time.perf_counter() - start
        embedder = Embedder("", opts)
        paths = list_images(images).paths
        start = time.perf_counter()
        embedder.embed_files(paths, progress=False)
        sync(embedder.device)
        embed_only = time.perf_counter() - start
        latency = [forward_latency(embedder, args.size, batch) for batch in args.latency_batches]
        rows.append({"model": model_name, "size": args.size, "device": str(embedder.device),
                     "amp": str(embedder.amp_dtype), "batch": args.batch, "images": args.images,
                     "end_to_end_s": end_to_end, "end_to_end_ips": args.images / end_to_end,
                     "embed_s": embed_only, "embed_ips": args.images / embed_only, "latency": latency})
        print(f"{model_name}: end to end {args.images / end_to_end:.1f} images/s, "
              f"embed {args.images / embed_only:.1f} images/s"
              + "".join(f", batch {r['batch']} {r['ms_per_image']:.2f} ms/image" for r in latency), flush=True)

    print("\n| model | input | device | batch | images | end to end (images/s) | embed only (images/s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['size'][0]}x{r['size'][1]} | {r['device']} | {r['batch']} | {r['images']} | "
              f"{r['end_to_end_ips']:.1f} | {r['embed_ips']:.1f} |")
    if args.latency_batches:
        print("\n| model | input | device | precision | batch | ms per batch | ms per image | calls |")
        print("|---|---|---|---|---:|---:|---:|---:|")
        for r in rows:
            for lat in r["latency"]:
                print(f"| {r['model']} | {r['size'][0]}x{r['size'][1]} | {r['device']} | "
                      f"{r['amp'] if r['amp'] != 'None' else 'fp32'} | {lat['batch']} | {lat['ms_per_batch']:.2f} | "
                      f"{lat['ms_per_image']:.3f} | {lat['calls']} |")
    info = {"machine": machine_info(args.device), "args": vars(args), "results": rows}  # load average at the end
    write_report(args.out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
