"""``history.csv``: one row per trained epoch, for a spreadsheet or pandas without TensorBoard.

Columns: ``epoch`` (epochs trained), ``lr``, ``train_loss`` (the epoch's mean), every other value the model logs
per epoch (the loss terms, ``dist_ap``/``dist_an``, ...; rank 0's under DDP), ``train_seconds`` and
``images_per_s`` (the training steps only, all processes, as the epoch log lines: ``EpochTimer``), then the evaluation's metrics on the epochs that were
evaluated (``mAP``, ``mINP``, ``rank1`` ... ``rank50``, then ``centroid_mAP`` ... and, with re-ranking or
query expansion, ``reranked_mAP`` ... / ``qe_mAP`` ...; empty cells elsewhere). Values have 7 significant digits.

The file is rewritten whole, atomically, after each epoch and each evaluation, so a killed run leaves a complete
file. A resume keeps the rows of the epochs its checkpoint holds and replaces those trained after it. An epoch
whose evaluation did not finish (the resume repeats it) gets only that evaluation's columns: its training values
were in the process that stopped, and a checkpoint holds weights, not logs.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from modelling.bases import EVAL_MODES, METRIC_KEYS
from utils.io import atomic_write_text

FILE_NAME = "history.csv"
EVAL_KEYS = METRIC_KEYS
# column prefix of each evaluation row: "", centroid_, reranked_, qe_
EVAL_PREFIXES = {mode: "" if mode == "standard" else mode.removeprefix("standard_") + "_" for mode in EVAL_MODES}
TIMING = ("train_seconds", "images_per_s")


def read_history(path: str) -> list[dict[str, str]]:
    """The rows of a history.csv, as strings (empty cells: ""); [] when there is none."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


class EpochTimer(Callback):
    """Times each epoch's training steps: from the epoch's start to the end of its last batch, so that the
    epoch's evaluation is not counted. A subclass overriding a hook calls this one's first."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.start = self.train_end = 0.0
        self.steps = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.train_end = time.perf_counter()
        self.steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self.steps += 1
        self.train_end = time.perf_counter()

    @property
    def train_seconds(self) -> float:
        return self.train_end - self.start

    def images_per_s(self, trainer: pl.Trainer) -> float:
        """Images per second over all processes (each trains ``images_per_step`` per step)."""
        return self.steps * self.images_per_step * trainer.world_size / max(self.train_seconds, 1e-9)


class EpochHistory(EpochTimer):
    """Writes ``<run_dir>/history.csv`` during ``fit`` (rank 0; see the module docstring)."""

    def __init__(self, run_dir: str, images_per_step: int):
        super().__init__(images_per_step)
        self.path = os.path.join(run_dir, FILE_NAME)
        self.rows: dict[int, dict[str, float]] = {}

    # ------------------------------------------------------------------ events
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resume's restore: the checkpoint holds current_epoch trained epochs.
        if not trainer.is_global_zero:
            return
        self.rows = {}
        for row in read_history(self.path):
            try:
                epoch = int(row["epoch"])
            except (KeyError, TypeError, ValueError):
                continue  # not a row of ours: the file is rewritten from the rows kept
            if epoch <= trainer.current_epoch:
                self.rows[epoch] = {k: float(v) for k, v in row.items() if k != "epoch" and v not in ("", None)}
        self._write()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = getattr(pl_module, "last_metrics", None)
        if trainer.state.fn != "fit" or trainer.sanity_checking or not trainer.is_global_zero or not metrics:
            return
        row = self.rows.setdefault(int(metrics["epochs_trained"]), {})
        for mode, prefix in EVAL_PREFIXES.items():
            for key in EVAL_KEYS if mode in metrics else ():
                row[prefix + key] = float(metrics[mode][key])
        self._write()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.steps:
            return
        eval_names = {prefix + key for prefix in EVAL_PREFIXES.values() for key in EVAL_KEYS}
        row = self.rows.setdefault(trainer.current_epoch + 1, {})
        for name, value in trainer.callback_metrics.items():
            if name.endswith("_step") or name in eval_names or name == "epoch":
                continue  # eval_names hold the latest evaluation's values, maybe of an earlier epoch
            name = name[:-len("_epoch")] if name.endswith("_epoch") else name
            row[name] = float(value)
        row["train_seconds"] = self.train_seconds
        row["images_per_s"] = self.images_per_s(trainer)
        self._write()

    # ------------------------------------------------------------------ file
    def _columns(self) -> list[str]:
        names = {name for row in self.rows.values() for name in row}
        evaluated = [prefix + key for prefix in EVAL_PREFIXES.values() for key in EVAL_KEYS if prefix + key in names]
        first = [name for name in ("lr", "train_loss") if name in names]
        rest = sorted(names - set(first) - set(TIMING) - set(evaluated))
        return ["epoch", *first, *rest, *[name for name in TIMING if name in names], *evaluated]

    def _write(self) -> None:
        columns = self._columns()
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        for epoch in sorted(self.rows):
            row = self.rows[epoch]
            writer.writerow([epoch, *(_cell(row.get(name)) for name in columns[1:])])
        atomic_write_text(self.path, text.getvalue())


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return format(value, ".7g") if math.isfinite(value) else str(value)  # 7 digits: what a float32 holds
