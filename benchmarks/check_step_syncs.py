"""Where a GPU training step waits for the device: CUDA's sync debug mode over a few steps.

    python benchmarks/check_step_syncs.py [--out syncs.json]

Trains the CTL model (ResNet18, 128x64, P=8 x K=4, the fast path: image cache, device augmentation,
channels_last, bf16; no compile) on a small synthetic set and turns on
``torch.cuda.set_sync_debug_mode("warn")`` from batch ``--warmup`` to the last one. Every operation
that makes the host wait for the GPU then warns; the report counts them by source line. A step
without mock images should show none in this project's code (Lightning's logging and progress bar
read values back every 10 steps by design). ``--resampling off`` (the recipe scripts' setting) uses
identities of six images, so that every batch holds mock images and the losses take their masked
path, whose selections are derived on the host: it should show none either. Without CUDA it says so
and exits 0.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import shutil
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from config import cfg_to_dict, load_config  # noqa: E402
from datasets.datamodule import ReIDDataModule  # noqa: E402
from datasets.synthetic import generate  # noqa: E402
from modelling.ctl_model import CTLModel  # noqa: E402
from utils.run import build_trainer, setup_logging  # noqa: E402


class SyncWindow(pl.Callback):
    def __init__(self, first: int, last: int):
        self.first, self.last, self.reached_last = first, last, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.first and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.last:
            self.reached_last = True
            if pl_module.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--warmup", type=int, default=3, help="batches before the window")
    parser.add_argument("--steps", type=int, default=6, help="batches inside the window")
    parser.add_argument("--resampling", choices=("on", "off"), default="on",
                        help="DATALOADER.USE_RESAMPLING: on gives batches without mocks, off batches with them")
    parser.add_argument("--out", help="JSON report")
    parser.add_argument("--cpu-plumbing", action="store_true",
                        help="run the same training on the CPU without the sync check (tests the script)")
    args = parser.parse_args(argv)
    setup_logging()  # the project's log format and filters (no Lightning adverts)
    if not torch.cuda.is_available() and not args.cpu_plumbing:
        print("no CUDA device: nothing to check")
        return 0
    work = tempfile.mkdtemp(prefix="check_syncs_")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # data and runs: nothing the report needs
    # 8 images per identity fill two K=4 groups; 6 leave a group of two real and two mock images.
    generate(os.path.join(work, "data"), train_ids=64, test_ids=4, cameras=4 if args.resampling == "on" else 3,
             images_per_camera=2, distractors=0, junk=0)
    total = args.warmup + args.steps
    opts = {"MODEL.NAME": "resnet18", "MODEL.BACKBONE_EMB_SIZE": 512, "MODEL.PRETRAINED": False,
            "INPUT.SIZE_TRAIN": [128, 64], "INPUT.SIZE_TEST": [128, 64], "DATASETS.NAMES": "market1501",
            "DATASETS.ROOT_DIR": os.path.join(work, "data"), "SOLVER.IMS_PER_BATCH": 8,
            "DATALOADER.NUM_INSTANCE": 4, "DATALOADER.USE_RESAMPLING": args.resampling == "on", "SOLVER.MAX_EPOCHS": 1,
            "SOLVER.MAX_ITERS_PER_EPOCH": total, "SOLVER.EVAL_PERIOD": 100, "OUTPUT_DIR": work,
            "DATALOADER.CACHE_IMAGES": "on", "DATALOADER.GPU_AUGMENT": "on", "MODEL.CHANNELS_LAST": "on",
            "MODEL.COMPILE": "off", "USE_MIXED_PRECISION": True,
            **({"GPU_IDS": [], "ACCELERATOR": "cpu", "INPUT.SIZE_TRAIN": [32, 16], "INPUT.SIZE_TEST": [32, 16]}
               if args.cpu_plumbing else {"GPU_IDS": [0]})}
    cfg = load_config(opts=[str(x) for pair in opts.items() for x in pair])
    datamodule = ReIDDataModule(cfg, seed=0)
    model = CTLModel(cfg=cfg_to_dict(cfg), num_classes=datamodule.num_classes, seed=0)
    trainer = build_trainer(cfg, work, max_epochs=1, with_checkpoints=False)
    window = SyncWindow(args.warmup, total - 1)
    trainer.callbacks.append(window)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=datamodule)
    if not window.reached_last:
        print(f"the epoch ended before batch {total - 1}: no report")
        return 1
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = collections.Counter(f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in syncs)
    print(f"{len(syncs)} synchronising operations in {args.steps} steps (batches {args.warmup}..{total - 1}):")
    for location, count in where.most_common():
        print(f"  {count:4d}  {location}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"steps": args.steps, "resampling": args.resampling, "total": len(syncs),
                       "by_location": dict(where)}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
