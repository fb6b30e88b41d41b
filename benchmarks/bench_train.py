"""Training throughput (images/s), plain vs fast configuration, in one run.

    python benchmarks/bench_train.py --model resnet18 --size 64 32 --p 4 --k 4 --steps 6 --device cpu
    python benchmarks/bench_train.py --device cuda          # the recipe: ResNet50 CTL, 256x128, P=16, K=4

Three measurements for each configuration:
  (a) data pipeline: train DataLoader -> device -> (fast: augmentation on the device), no model;
  (b) training step: ``trainer.fit`` on one in-memory, already augmented batch on the device (forward,
      losses, backward, both optimisers), so only the model side differs;
  (c) end to end: ``trainer.fit`` with the real data module (no validation).
"plain" is fp32, no channels_last, no compile, plain Adam, PIL augmentation in the loader; "fast" is
the GPU defaults forced on: channels_last, fused Adam, device augmentation from the uint8 image cache,
bf16 autocast (GPU only), and torch.compile as ``--compile`` says. The first ``--warmup`` batches are
not timed (compilation, cuDNN autotuning, worker start-up); the image cache's one-off build time is
reported apart. Without ``--data-root`` a synthetic Market-layout set is generated and its train
images are upscaled to ``--synthetic-size`` (Market-1501's crops are 128x64) so that decoding costs
about what real crops cost; its identities have uneven image counts, as real ones do.
``--resampling`` is ``DATALOADER.USE_RESAMPLING``, by default ``off`` as in the recipe scripts: most
batches then hold mock images (the share is printed), the losses' masked path. Prints a table and
writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import atexit
import glob
import math
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from benchmarks.common import machine_info, sync, write_report  # noqa: E402
from config import cfg_to_dict, load_config  # noqa: E402
from datasets.datamodule import ReIDDataModule  # noqa: E402
from datasets.gpu_augment import apply_augment_params, draw_augment_params  # noqa: E402
from datasets.synthetic import generate  # noqa: E402
from modelling.backbones import BACKBONES  # noqa: E402
from modelling.ctl_model import CTLModel  # noqa: E402
from utils.run import build_trainer, setup_logging  # noqa: E402

PLAIN = {"MODEL.CHANNELS_LAST": "off", "MODEL.COMPILE": "off", "SOLVER.FUSED_OPTIMIZER": "off",
         "DATALOADER.GPU_AUGMENT": "off", "DATALOADER.CACHE_IMAGES": "off", "USE_MIXED_PRECISION": "False"}
FAST = {"MODEL.CHANNELS_LAST": "on", "SOLVER.FUSED_OPTIMIZER": "on", "DATALOADER.GPU_AUGMENT": "on",
        "DATALOADER.CACHE_IMAGES": "on", "USE_MIXED_PRECISION": "True", "MIXED_PRECISION_DTYPE": "bf16"}


def synthetic_root(folder: str, p: int, k: int, batches: int, size: tuple[int, int]) -> str:
    """A synthetic Market-layout set with enough identities for ``batches`` P x K batches in one epoch.

    Identity i keeps 16 - (i mod K) of its 16 train images: real sets have uneven identities, and
    without resampling (the recipes) an identity whose count is no multiple of K gets a group padded
    with mock images, which the losses must mask (nearly every batch holds one, as on Market-1501).
    """
    per_id = 4 * 4  # 4 cameras x 4 images
    train_ids = max(2 * p, math.ceil(batches * p / ((per_id - k + 1) // k)) + p)  # groups of the smallest id
    generate(folder, train_ids=train_ids, test_ids=4, cameras=4, images_per_camera=4, distractors=0, junk=0)
    height, width = size
    by_pid: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "market1501", "bounding_box_train", "*.jpg"))):
        by_pid.setdefault(os.path.basename(path).split("_")[0], []).append(path)
    for index, paths in enumerate(by_pid.values()):
        drop = index % k
        for path in paths[len(paths) - drop:] if drop else []:
            os.remove(path)
        for path in paths[:len(paths) - drop]:
            with Image.open(path) as img:
                img.convert("RGB").resize((width, height), Image.BILINEAR).save(path, quality=90)
    return folder


def make_cfg(args, variant: str, out_dir: str):
    opts = {"MODEL.NAME": args.model, "MODEL.BACKBONE_EMB_SIZE": BACKBONES[args.model].feat_dim,
            "MODEL.PRETRAINED": False, "INPUT.SIZE_TRAIN": list(args.size), "INPUT.SIZE_TEST": list(args.size),
            "DATASETS.NAMES": args.dataset, "DATASETS.ROOT_DIR": args.data_root, "DATASETS.VERIFY_IMAGES": False,
            "DATALOADER.NUM_WORKERS": args.workers, "DATALOADER.NUM_INSTANCE": args.k, "SOLVER.IMS_PER_BATCH": args.p,
            "DATALOADER.USE_RESAMPLING": args.resampling == "on", "SOLVER.MAX_EPOCHS": 1, "SOLVER.EVAL_PERIOD": 1000,
            "SOLVER.MAX_ITERS_PER_EPOCH": args.warmup + args.steps, "OUTPUT_DIR": out_dir,
            # REPRODUCIBLE False, as the recipes train: cuDNN autotuning on (seeds are passed explicitly).
            "REPRODUCIBLE": False,
            "GPU_IDS": [0] if args.device == "cuda" else [], "ACCELERATOR": "gpu" if args.device == "cuda" else "cpu"}
    opts.update(PLAIN if variant == "plain" else {**FAST, "MODEL.COMPILE": args.compile})
    return load_config(opts=[str(x) for pair in opts.items() for x in pair])


def forever(loader: DataLoader):
    while True:
        yield from loader


def augment(cfg, images: torch.Tensor, is_real: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The device augmentation as ModelBase.on_after_batch_transfer runs it (inputs on the device)."""
    inp = cfg.INPUT
    params = draw_augment_params(images.shape[0], images.shape[-2:], flip_prob=inp.PROB, padding=inp.PADDING,
                                 erase_prob=inp.RE_PROB, generator=generator).to(images.device)
    return apply_augment_params(images, params, padding=inp.PADDING, mean=inp.PIXEL_MEAN, std=inp.PIXEL_STD,
                                is_real=is_real)


def bench_pipeline(cfg, device: torch.device, warmup: int, steps: int) -> dict:
    """(a) Images/s of the train loader, moved to the device and (fast) augmented there."""
    datamodule = ReIDDataModule(cfg, seed=0)
    cache_s = 0.0
    if datamodule.fast_path().cache_images:
        start = time.perf_counter()
        datamodule.image_cache()
        cache_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    images_seen, start, mock_batches = 0, None, 0
    for index, (images, _pids, _camids, is_real) in enumerate(forever(datamodule.train_dataloader())):
        mock_batches += index >= warmup and not bool(is_real.all())
        if index == warmup:
            sync(device)
            start = time.perf_counter()
        images = images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = augment(cfg, images, is_real.to(device, non_blocking=True), generator)
        if index >= warmup:
            images_seen += images.shape[0]
        if index + 1 == warmup + steps:
            break
    sync(device)
    return {"images_per_s": images_seen / (time.perf_counter() - start), "cache_build_s": cache_s,
            "train_images": len(datamodule.splits.train), "batches_with_mocks": mock_batches / steps}


class StepTimer(pl.Callback):
    """Wall time from the end of batch ``warmup - 1`` to the end of batch ``last`` (all work in between).

    The device is synchronised at those two points only, so data loading may overlap device work.
    """

    def __init__(self, warmup: int, last: int):
        self.warmup, self.last, self.start, self.end, self.images = warmup, last, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.images += batch[0].shape[0]
        if batch_idx in (self.warmup - 1, self.last):
            sync(pl_module.device)
            if batch_idx == self.warmup - 1:
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()

    def images_per_s(self) -> float:
        return self.images / (self.end - self.start)


class SameBatch(Dataset):
    def __init__(self, batch, length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.batch


def fit_and_time(cfg, run_dir: str, warmup: int, num_classes: int, **fit_kwargs) -> float:
    torch.manual_seed(0)
    model = CTLModel(cfg=cfg_to_dict(cfg), num_classes=num_classes, seed=0)
    trainer = build_trainer(cfg, run_dir, max_epochs=1, with_checkpoints=False)
    timer = StepTimer(warmup, last=cfg.SOLVER.MAX_ITERS_PER_EPOCH - 1)
    trainer.callbacks.append(timer)
    trainer.fit(model, **fit_kwargs)
    if timer.end is None:
        raise RuntimeError(f"An epoch ended before batch {timer.last}: give a data root with more identities, "
                           "or fewer --steps/--warmup.")
    return timer.images_per_s()


def bench_step(cfg, device: torch.device, warmup: int, steps: int, run_dir: str) -> float:
    """(b) Images/s of ``trainer.fit`` on one augmented batch that already lives on the device."""
    datamodule = ReIDDataModule(cfg, seed=0)
    images, pids, camids, is_real = next(iter(datamodule.train_dataloader()))
    if images.dtype == torch.uint8:  # the fast config's loader: augment once, as the model would
        images = augment(cfg, images, is_real, torch.Generator().manual_seed(0))
    # is_real stays on the host, as a real loader delivers it: the model reads it there before the
    # transfer (a device tensor would cost a synchronisation per step that training does not pay).
    batch = (*(t.to(device) for t in (images, pids, camids)), is_real)
    loader = DataLoader(SameBatch(batch, warmup + steps), batch_size=None)
    return fit_and_time(cfg, run_dir, warmup, datamodule.num_classes, train_dataloaders=loader)


def bench_end_to_end(cfg, warmup: int, run_dir: str) -> float:
    """(c) Images/s of ``trainer.fit`` with the real data module."""
    datamodule = ReIDDataModule(cfg, seed=0)
    return fit_and_time(cfg, run_dir, warmup, datamodule.num_classes, datamodule=datamodule)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=sorted(BACKBONES))
    parser.add_argument("--size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"), help="INPUT.SIZE_TRAIN")
    parser.add_argument("--p", type=int, default=16, help="identities per batch (SOLVER.IMS_PER_BATCH)")
    parser.add_argument("--k", type=int, default=4, help="images per identity (DATALOADER.NUM_INSTANCE)")
    parser.add_argument("--steps", type=int, default=50, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first (>= 1)")
    parser.add_argument("--workers", type=int, default=-1, help="DATALOADER.NUM_WORKERS of the plain loader "
                                                                "(-1 = auto; the cached fast loader uses none)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="MODEL.COMPILE of 'fast'")
    parser.add_argument("--data-root", default="", help="DATASETS.ROOT_DIR (default: generate a synthetic set)")
    parser.add_argument("--dataset", default="market1501", help="DATASETS.NAMES for --data-root")
    parser.add_argument("--synthetic-size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"),
                        help="stored size of the generated train images")
    parser.add_argument("--resampling", choices=("on", "off"), default="off",
                        help="DATALOADER.USE_RESAMPLING; off, as the recipe scripts train, gives batches with "
                             "mock images (masked in the losses)")
    parser.add_argument("--only", nargs="*", default=["pipeline", "step", "end_to_end"],
                        choices=("pipeline", "step", "end_to_end"))
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_train.json"), help="JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1")
    setup_logging()
    work = tempfile.mkdtemp(prefix="bench_train_")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # data and runs: nothing the report needs
    if not args.data_root:
        args.data_root = synthetic_root(os.path.join(work, "data"), args.p, args.k, args.warmup + args.steps,
                                        tuple(args.synthetic_size))
        args.dataset = "market1501"
    device = torch.device(args.device)

    rows = []
    for variant in ("plain", "fast"):
        cfg = make_cfg(args, variant, os.path.join(work, variant))
        row = {"config": variant}
        if "pipeline" in args.only:
            row.update({f"pipeline_{k}": v for k, v in bench_pipeline(cfg, device, args.warmup, args.steps).items()})
        if "step" in args.only:
            row["step_images_per_s"] = bench_step(cfg, device, args.warmup, args.steps,
                                                  os.path.join(work, variant, "step"))
        if "end_to_end" in args.only:
            row["end_to_end_images_per_s"] = bench_end_to_end(cfg, args.warmup, os.path.join(work, variant, "e2e"))
        rows.append(row)
        print(f"{variant}: {row}", flush=True)

    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.1f}" if key in row else "-"

    print(f"\n{args.model} {args.size[0]}x{args.size[1]}, P={args.p} K={args.k}, {args.steps} timed steps, "
          f"{args.device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print("| config | (a) data pipeline | (b) training step | (c) end to end | image cache build (s) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['config']} | {cell(row, 'pipeline_images_per_s')} | {cell(row, 'step_images_per_s')} | "
              f"{cell(row, 'end_to_end_images_per_s')} | {cell(row, 'pipeline_cache_build_s')} |")
    mocks = [row["pipeline_batches_with_mocks"] for row in rows if "pipeline_batches_with_mocks" in row]
    print(f"(images/s; resampling {args.resampling}" +
          (f", {100 * mocks[0]:.0f}% of the timed batches hold mock images)" if mocks else ")"))
    machine = machine_info(args.device, platform=platform.platform(), torchvision=torchvision.__version__,
                           pytorch_lightning=pl.__version__)  # load average at the end
    report = {"machine": machine, "args": vars(args), "results": rows}
    write_report(args.out, report)
    shutil.rmtree(work, ignore_errors=True)  # generated data, TensorBoard logs
    return 0


if __name__ == "__main__":
    sys.exit(main())
