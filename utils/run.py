"""Entry-point orchestration shared by ``train_ctl_model.py`` and ``train_baseline.py``.

``main`` parses ``--config_file=FILE KEY VALUE ...``, checks everything that can be checked before
a model exists (config, output folder, dataset, weight files), then trains ``REPRODUCIBLE_NUM_RUNS``
runs, resumes one, or evaluates a checkpoint (``TEST.ONLY_TEST``).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import warnings
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from tqdm import tqdm

from config import ConfigError, cfg_to_dict, parse_cli
from datasets import DatasetError, dataset_names
from datasets.datamodule import ReIDDataModule
from modelling.bases import EVAL_MODES, METRIC_KEYS, ModelBase
from modelling.pretrained import fetch_hint
from modelling.schedule import lr_at_epoch
from modelling.weights import (WeightsError, check_architecture, checkpoint_config, describe_mismatch, explicit_keys,
                               load_backbone_weights, load_project_checkpoint)
from utils.history import EpochHistory, EpochTimer
from utils.io import atomic_binary_file, atomic_write_text

log = logging.getLogger("centroids_reid")

class RunError(RuntimeError):
    """A problem found before training starts (output folder, resume target, ...)."""


class _ProgressBarSafeHandler(logging.StreamHandler):
    """Writes each record inside ``tqdm.external_write_mode``: an open progress bar (Lightning's) is
    cleared and redrawn around the line instead of the line being glued to the bar's. The line and
    its newline go out in one write, as logging's own handler does: DDP ranks share the stream, and
    tqdm.write's two writes let their lines interleave."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            with tqdm.external_write_mode(file=self.stream):
                self.stream.write(line)
                self.flush()
        except Exception:  # as logging.StreamHandler does: report, never raise
            self.handleError(record)


def _not_a_lightning_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip:")  # adverts for Lightning's cloud products


def setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:  # leave handlers alone when embedded (pytest, notebooks)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S", handlers=[_ProgressBarSafeHandler(sys.stdout)])
        # Lightning gave its loggers a plain stderr handler at import (no root handler then).
        for name in ("pytorch_lightning", "lightning_fabric"):
            handlers = logging.getLogger(name).handlers
            for i, handler in enumerate(handlers):
                if type(handler) is logging.StreamHandler:
                    handlers[i] = _ProgressBarSafeHandler(handler.stream)
                    handlers[i].setFormatter(handler.formatter)
    for name in ("centroids_reid", "modelling", "datasets", "utils", "inference"):
        logging.getLogger(name).setLevel(logging.INFO)
    # Lightning's own hints (worker counts, sanity checks, a logger product) and a deprecation inside
    # Lightning that torch >= 2.12 reports on every run are noise for this project's runs.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # Under DDP Lightning recommends sync_dist=True for every epoch-level value, about 14 times a run. Here
    # the evaluation metrics are computed on rank 0 from all ranks' features and broadcast, the learning rate
    # is the same on every rank, and the training losses are rank 0's (syncing them costs a sync per step).
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    tips = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _not_a_lightning_tip not in tips.filters:
        tips.addFilter(_not_a_lightning_tip)


def output_dir_of(cfg) -> str:
    return cfg.OUTPUT_DIR or os.path.join(cfg.LOG_DIR, "+".join(dataset_names(cfg)))


def check_output_dir(path: str, *, need_bytes: int = 0) -> None:
    """Fail now, not after an epoch, if ``path`` is not writable or has less than ``need_bytes`` free."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_probe_{os.getpid()}")  # one per process: DDP ranks run this too
        with open(probe, "w") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as err:
        raise RunError(f"OUTPUT_DIR {path} is not writable: {err}") from err
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise RunError(f"OUTPUT_DIR {path} has {free / 2**20:.0f} MiB free; this run's checkpoints need about "
                       f"{need_bytes / 2**20:.0f} MiB (best.ckpt, last.ckpt and a save in progress). Free some "
                       "space or choose another OUTPUT_DIR.")


def check_accelerator(cfg) -> None:
    if cfg.ACCELERATOR in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("ACCELERATOR is 'gpu' but no GPU is visible; use ACCELERATOR cpu (or auto).")


def warn_about_schedule(cfg) -> None:
    """Say so when SOLVER.MAX_EPOCHS cuts the learning-rate schedule short (a shortened recipe)."""
    s = cfg.SOLVER
    if s.USE_WARMUP_LR and s.WARMUP_EPOCHS > s.MAX_EPOCHS:
        log.warning("SOLVER.WARMUP_EPOCHS %d > SOLVER.MAX_EPOCHS %d: the learning rate never reaches "
                    "SOLVER.BASE_LR (the last epoch trains at %.3g).", s.WARMUP_EPOCHS, s.MAX_EPOCHS,
                    lr_at_epoch(s.MAX_EPOCHS - 1, s))
    late = [step for step in s.LR_STEPS if step >= s.MAX_EPOCHS]
    if s.LR_SCHEDULER_NAME == "multistep_lr" and late:
        log.warning("SOLVER.LR_STEPS %s at or after SOLVER.MAX_EPOCHS %d never take effect: scale them with "
                    "the epochs for a shortened recipe.", late, s.MAX_EPOCHS)


def resolve_devices(cfg) -> tuple[str, int | list[int]]:
    """Lightning ``(accelerator, devices)``; without a GPU the default GPU_IDS falls back to the CPU."""
    check_accelerator(cfg)
    has_gpu = torch.cuda.is_available()
    accelerator = cfg.ACCELERATOR
    if accelerator == "auto":
        if has_gpu and cfg.GPU_IDS:
            accelerator = "gpu"
        else:
            if cfg.GPU_IDS and not has_gpu:
                log.warning("No GPU found: running on the CPU (GPU_IDS %s ignored). Set GPU_IDS [] to silence this.",
                            list(cfg.GPU_IDS))
            accelerator = "cpu"
    if accelerator in ("gpu", "cuda"):
        return "gpu", cfg.DEVICES if cfg.DEVICES > 0 else (list(cfg.GPU_IDS) or 1)
    return "cpu", cfg.DEVICES or 1


# Where Lightning keeps the progress of the evaluation inside fit, in a checkpoint's ``loops``.
_EVAL_PROGRESS = "epoch_loop.val_loop.batch_progress"


def evaluation_pending(checkpoint: dict) -> bool:
    """Whether ``checkpoint`` holds a trained epoch whose evaluation has not run to its end (written by
    ``LastCheckpoint`` just before that evaluation): resuming from it repeats the evaluation first."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get(_EVAL_PROGRESS, {}).get("total", {})
    return progress.get("processed", 0) < progress.get("started", 0)


class LastCheckpoint(Checkpoint):
    """``<dirpath>/last.ckpt`` after every ``period``-th training epoch and after the final one, and on
    those epochs also just before their evaluation.

    Lightning's ``ModelCheckpoint(every_n_epochs=period)`` skips the final epoch when ``period``
    does not divide ``max_epochs``, leaving the weights behind ``metrics.json`` unsaved. Being a
    ``Checkpoint``, this runs after the module's own ``on_train_epoch_end``, as ModelCheckpoint does;
    ``trainer.save_checkpoint`` writes atomically and only on rank 0.

    ``on_train_epoch_end`` runs after the epoch's evaluation, so an evaluation that fails (out of memory
    in re-ranking, an image that became unreadable, a full disk under visrank/, Ctrl-C, a kill) used to
    lose the epoch's training. The epoch is therefore also saved when its evaluation starts, with the
    evaluation's progress as Lightning saves it inside the first evaluation step. Resuming from that
    (Lightning 2.6: "restarted mid evaluation") trains nothing, repeats the whole evaluation
    (metrics.json; best.ckpt, with ModelCheckpoint's state from before it), then goes on with the next
    epoch, as the run would have. Saved with the progress as it is at ``on_validation_start``, Lightning
    would skip this evaluation on resume; saved in ``on_exception``, the same after a failure in the
    metrics, and after one in an embedding step it would embed from the first batch again but stop as
    many batches short as were done (the loader is not resumable), which ``_gathered_features`` rejects.
    """

    def __init__(self, dirpath: str, period: int):
        self.path, self.period = os.path.join(dirpath, "last.ckpt"), period
        self._saving_before_evaluation = False
        self._unevaluated_epoch: int | None = None  # saved before its evaluation, which has not ended yet

    def _due(self, trainer: pl.Trainer) -> bool:
        epochs_done = trainer.current_epoch + 1
        return epochs_done % self.period == 0 or epochs_done >= trainer.max_epochs

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The evaluation after a training epoch inside fit; not trainer.validate, nor a sanity check.
        if (trainer.state.fn != "fit" or trainer.sanity_checking
                or not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            return
        # Zero, as Lightning sets them when an epoch starts, unless this evaluation repeats one saved below:
        # its counts would otherwise run on from "one step started", and every checkpoint written during or
        # after it (best.ckpt) would look interrupted in its first step too.
        trainer.fit_loop.epoch_loop.val_loop.batch_progress.total.reset()
        if not self._due(trainer):
            return
        self._saving_before_evaluation = True
        try:
            trainer.save_checkpoint(self.path, weights_only=False)
        finally:
            self._saving_before_evaluation = False
        self._unevaluated_epoch = trainer.current_epoch

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if not self._saving_before_evaluation:
            return
        # The evaluation's progress as Lightning saves it inside its first step (ready and started, not
        # processed), whether this evaluation is the first or one repeated by a resume.
        progress = checkpoint["loops"]["fit_loop"][_EVAL_PROGRESS]
        for counts in (progress["total"], progress["current"]):
            counts.update(ready=1, started=1, processed=0, completed=0)
        progress["is_last_batch"] = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unevaluated_epoch = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):
            trainer.save_checkpoint(self.path, weights_only=False)  # a full checkpoint: optimisers for resume

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        epoch = self._unevaluated_epoch
        if epoch is None or not trainer.is_global_zero:
            return
        if isinstance(exception, KeyboardInterrupt):
            reason = "interrupted"
        else:
            reason = f"{type(exception).__name__}: {(user_message(exception).splitlines() or [''])[0]}"
        then = f"continues with epoch {epoch + 2}" if epoch + 1 < trainer.max_epochs else "finishes the run"
        log.error("The evaluation after epoch %d/%d did not finish (%s). That epoch's training is saved in %s: "
                  "the same command with MODEL.RESUME_TRAINING True MODEL.PRETRAIN_PATH \"\" repeats this "
                  "evaluation and %s.", epoch + 1, trainer.max_epochs, reason, self.path, then)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their final path, then renamed into place.

    Lightning's ``TorchCheckpointIO`` writes through fsspec, whose temporary file lives in ``$TMPDIR``
    and is then moved: a copy, not an atomic rename, when ``$TMPDIR`` is on another filesystem than
    OUTPUT_DIR (a kill during the copy leaves a truncated ``last.ckpt``), and on a disk that the
    start-up space check does not look at. It also holds the whole serialised checkpoint in memory.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_binary_file(os.fspath(path)) as handle:
            torch.save(checkpoint, handle)


class ValidateFinalEpoch(Callback):
    """Validate after the final training epoch too, inside ``fit``, so that ``best.ckpt`` weighs its
    metrics (Lightning validates every ``check_val_every_n_epoch`` epochs only)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= trainer.max_epochs:
            trainer.check_val_every_n_epoch = 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resume that repeats the final epoch's evaluation (LastCheckpoint) starts no epoch.
        self.on_train_epoch_start(trainer, pl_module)


class ShareRunSeed(Callback):
    """Every rank takes rank 0's run seed once the process group is up (``setup``, before the
    first dataloader is built).

    A seed drawn at random (``REPRODUCIBLE False``) differs between processes started on their
    own (torchrun, srun) or before it was drawn (Lightning's launcher starts ranks 1..N-1 during
    the first run's ``fit``). The PK sampler's plan is a function of the seed, so with different
    seeds the ranks no longer draw disjoint identities. Weights need nothing: DDP copies rank 0's.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size < 2:
            return
        seed = int(trainer.strategy.broadcast(int(pl_module.hparams.seed), src=0))
        pl_module.hparams.seed = seed
        if trainer.datamodule is not None:
            trainer.datamodule.seed = seed


class LossProgressBar(TQDMProgressBar):
    """Lightning's bar, showing the latest training loss (``ModelBase.bar_loss``) read back from the
    device only when the bar refreshes, every ``refresh_rate`` steps."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "bar_loss", None)
        if trainer.training and loss is not None:
            metrics["loss"] = f"{float(loss):.3f}"
        return metrics


class EpochLogLines(EpochTimer):
    """Log lines instead of a progress bar, for logs that are not a terminal (batch jobs, ``| tee``),
    where a bar's redraws pile up as one endless line: one line per training epoch (written before
    its evaluation, timing the training steps only), a progress line at most every ``interval``
    seconds within a long epoch, and one line when an evaluation starts. The loss is summed on the
    device and read back only for a line."""

    def __init__(self, images_per_step: int, interval: float = 60.0):
        super().__init__(images_per_step)
        self.interval = interval
        self.pending = False

    def _mean_loss(self) -> str:
        return f"loss {float(self.loss_sum) / self.steps:.3f}, " if self.loss_sum is not None else ""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.last_line = self.start
        self.loss_sum, self.pending = None, True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.loss_sum = loss.detach().float() if self.loss_sum is None else self.loss_sum + loss.detach().float()
        if trainer.is_global_zero and self.train_end - self.last_line >= self.interval:
            self.last_line = self.train_end
            log.info("Epoch %d/%d: step %d/%s, %s%.0f s so far", trainer.current_epoch + 1, trainer.max_epochs,
                     self.steps, trainer.num_training_batches, self._mean_loss(), self.train_end - self.start)

    def _epoch_line(self, trainer: pl.Trainer) -> None:
        if not self.pending:
            return
        self.pending = False
        if not trainer.is_global_zero or not self.steps:
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        log.info("Epoch %d/%d: %s%d steps in %.1f s (%.0f images/s over %d process(es)), lr %.3g",
                 trainer.current_epoch + 1, trainer.max_epochs, self._mean_loss(), self.steps, self.train_seconds,
                 self.images_per_s(trainer), trainer.world_size, lr)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_line(trainer)
        datamodule = trainer.datamodule
        if trainer.is_global_zero and datamodule is not None:
            log.info("Evaluating: embedding %d query and %d gallery images", datamodule.num_query,
                     len(datamodule.eval_records) - datamodule.num_query)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_line(trainer)


def build_trainer(cfg, run_dir: str, *, max_epochs: int, with_checkpoints: bool = True,
                  log_name: str = "tensorboard") -> pl.Trainer:
    """The Lightning trainer of a run. with_checkpoints: write best.ckpt and last.ckpt (see the README)
    and validate after the final epoch whatever ``SOLVER.EVAL_PERIOD`` is."""
    accelerator, devices = resolve_devices(cfg)
    num_devices = len(devices) if isinstance(devices, list) else devices
    precision = "32-true"
    if cfg.USE_MIXED_PRECISION and accelerator == "gpu":
        precision = "bf16-mixed" if cfg.MIXED_PRECISION_DTYPE == "bf16" else "16-mixed"
    distributed = num_devices > 1 or cfg.NUM_NODES > 1
    bar = cfg.PROGRESS_BAR == "on" or (cfg.PROGRESS_BAR == "auto" and sys.stdout.isatty())
    # Each bar refresh reads the loss back from the device (a GPU sync): every 10 steps, not every step.
    callbacks = [LossProgressBar(refresh_rate=10) if bar
                 else EpochLogLines(cfg.SOLVER.IMS_PER_BATCH * cfg.DATALOADER.NUM_INSTANCE), ShareRunSeed()]
    if with_checkpoints:
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        callbacks += [
            ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=cfg.SOLVER.MONITOR_METRIC_NAME,
                            mode=cfg.SOLVER.MONITOR_METRIC_MODE, save_top_k=1, enable_version_counter=False),
            LastCheckpoint(ckpt_dir, cfg.SOLVER.CHECKPOINT_PERIOD),
            ValidateFinalEpoch(),
            EpochHistory(run_dir, cfg.SOLVER.IMS_PER_BATCH * cfg.DATALOADER.NUM_INSTANCE),
        ]
    return pl.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=cfg.NUM_NODES,
        strategy=cfg.SOLVER.DIST_BACKEND if distributed else "auto",
        precision=precision, max_epochs=max_epochs, check_val_every_n_epoch=cfg.SOLVER.EVAL_PERIOD,
        limit_train_batches=cfg.SOLVER.MAX_ITERS_PER_EPOCH or None, num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the PK sampler shards by rank itself
        # The PK plan's length changes from epoch to epoch, and Lightning reads a loader's length
        # once: without a fresh loader per epoch, a longer epoch would lose its last batches.
        reload_dataloaders_every_n_epochs=1,
        callbacks=callbacks,
        logger=TensorBoardLogger(save_dir=run_dir, name=log_name, version=""),
        enable_checkpointing=with_checkpoints, log_every_n_steps=10, default_root_dir=run_dir,
        plugins=[AtomicCheckpointIO()], enable_progress_bar=bar,
        benchmark=accelerator == "gpu" and not cfg.REPRODUCIBLE)


def run_seed(cfg, run_index: int) -> int:
    """The run's seed: fixed when REPRODUCIBLE, else drawn at random (under DDP every rank then
    takes rank 0's: see ``ShareRunSeed``)."""
    if cfg.REPRODUCIBLE:
        return cfg.REPRODUCIBLE_SEED + run_index
    return int.from_bytes(os.urandom(4), "little") % (2**31)


def checkpoint_files(run_dir: str) -> list[str]:
    """The checkpoints a run in ``run_dir`` wrote (best.ckpt, last.ckpt)."""
    return glob.glob(os.path.join(run_dir, "checkpoints", "*.ckpt"))


def newest_checkpoint(run_dir: str) -> str | None:
    candidates = checkpoint_files(run_dir)
    return max(candidates, key=os.path.getmtime) if candidates else None


def read_metrics(path: str) -> dict | None:
    """The ``metrics.json`` at ``path``, or None when it is missing, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as handle:
            metrics = json.load(handle)
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def written_by_training(metrics: dict) -> bool:
    """Whether a ``metrics.json`` is a training run's: a TEST.ONLY_TEST evaluation names its checkpoint."""
    return "checkpoint" not in metrics


def finished_metrics(run_dir: str, max_epochs: int) -> dict | None:
    """The metrics of a run in ``run_dir`` that finished (DONE) after ``max_epochs`` epochs, else None."""
    if not os.path.isfile(os.path.join(run_dir, "DONE")):
        return None
    metrics = read_metrics(os.path.join(run_dir, "metrics.json"))
    if metrics is not None and not written_by_training(metrics):  # a TEST.ONLY_TEST moved the training's aside
        metrics = read_metrics(os.path.join(run_dir, "metrics_training.json"))
    if metrics is None or metrics.get("epochs_trained") != max_epochs or not written_by_training(metrics):
        return None
    return metrics


def check_no_earlier_training(out_dir: str) -> None:
    """A new training must not replace the checkpoints and results of an earlier one in ``out_dir``
    (its own folder or its run_<i> folders). Lightning's versioned folders never did; a run stopped
    half-way over a finished one would also leave a DONE beside new checkpoints."""
    found = []
    for run_dir in [out_dir, *sorted(glob.glob(os.path.join(out_dir, "run_*")))]:
        found += checkpoint_files(run_dir)
        found += [path for path in [os.path.join(run_dir, "DONE")] if os.path.isfile(path)]
    if found:
        shown = ", ".join(os.path.relpath(path, out_dir) for path in found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunError(f"OUTPUT_DIR {out_dir} holds an earlier training ({shown}). MODEL.RESUME_TRAINING True "
                       "continues it; to train anew, choose another OUTPUT_DIR or delete that one.")


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About the size of one full checkpoint of ``model``: parameters and buffers, the optimiser's
    state (Adam's two moments per parameter; SGD's momentum needs less) and 1 MiB of metadata."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * params + sum(b.numel() * b.element_size() for b in model.buffers()) + 2**20


def check_checkpoint_space(model: torch.nn.Module, run_dir: str) -> None:
    """Room for best.ckpt and last.ckpt and the temporary file of an atomic save; checkpoints already
    in ``run_dir`` (a resume) are replaced, so their space counts as free."""
    present = sum(os.path.getsize(path) for path in checkpoint_files(run_dir))
    check_output_dir(run_dir, need_bytes=max(0, 3 * checkpoint_bytes(model) - present))


def check_start_weights(cfg) -> None:
    """A WeightsError when a new training would start from a MODEL.PRETRAIN_PATH that does not exist."""
    path = cfg.MODEL.PRETRAIN_PATH
    if cfg.MODEL.PRETRAINED and path and not os.path.isfile(path):
        hint = fetch_hint(cfg.MODEL.NAME)
        raise WeightsError(
            f"MODEL.PRETRAIN_PATH file not found: {path}. Put the ImageNet weights there (README, 'Weights'; "
            "training downloads nothing), point the key at your file, or set MODEL.PRETRAINED False to train "
            "from scratch." + (f" {hint}" if hint else ""))


def started_weights(config_path: str) -> str:
    """The MODEL.PRETRAIN_PATH that the training in ``config_path`` (its config.yaml) started from, or ""."""
    try:
        with open(config_path, encoding="utf-8") as handle:
            model = (yaml.safe_load(handle) or {}).get("MODEL") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return ""
    path = model.get("PRETRAIN_PATH")
    return path if model.get("PRETRAINED") is True and isinstance(path, str) else ""


def describe_data(datamodule: ReIDDataModule) -> None:
    """The splits' sizes, and warnings about training identities the sampler handles specially."""
    log.info("%s", datamodule.splits.summary())
    datamodule.warn_about_small_identities()


def train_one_run(model_cls: type[ModelBase], cfg, run_dir: str, run_index: int, *, start_weights: str = "",
                  data: ReIDDataModule | None = None) -> dict:
    """Train (or resume) one run in ``run_dir`` and return its final metrics. start_weights: when resuming
    every run (an empty MODEL.PRETRAIN_PATH), the weights that a run with nothing to resume starts from:
    those the training was started with, not random ones. data: the datamodule built and checked at start-up,
    whose records and image cache every run shares (default: built, checked and summarised here)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = run_dir
    resume_path = None
    if cfg.MODEL.RESUME_TRAINING:
        resume_path = cfg.MODEL.PRETRAIN_PATH or newest_checkpoint(run_dir)
        if resume_path is None:
            log.info("Run %d/%d: nothing to resume in %s, starting fresh%s.", run_index + 1,
                     cfg.REPRODUCIBLE_NUM_RUNS, run_dir,
                     f" from the weights the training was started with, {start_weights}" if start_weights else "")
            cfg.MODEL.PRETRAIN_PATH = start_weights
    cfg.freeze()
    if resume_path:
        # Only its metadata is read here (the tensors are mapped, not read): Lightning loads it for the resume.
        checkpoint = load_project_checkpoint(resume_path, mmap=True)
        check_architecture(cfg, checkpoint, resume_path)
        saved_type = checkpoint["hyper_parameters"].get("model_type")
        if saved_type is not None and saved_type != model_cls.model_type:
            raise ConfigError(f"{resume_path} was trained as the {saved_type} model; this script trains the "
                              f"{model_cls.model_type} model. Resume it with the script it was trained with.")
        seed = int(checkpoint["hyper_parameters"]["seed"])
        next_epoch = checkpoint.get("epoch", -1) + 1
        pending = evaluation_pending(checkpoint)
        del checkpoint
        finished = finished_metrics(run_dir, cfg.SOLVER.MAX_EPOCHS)
        if finished is not None and next_epoch >= cfg.SOLVER.MAX_EPOCHS:
            log.info("Run %d/%d finished its %d epochs already: keeping its metrics.json.", run_index + 1,
                     cfg.REPRODUCIBLE_NUM_RUNS, cfg.SOLVER.MAX_EPOCHS)
            return finished
        if pending:  # saved before an evaluation that did not finish (LastCheckpoint)
            then = (f"then continuing with epoch {next_epoch + 1} of {cfg.SOLVER.MAX_EPOCHS}"
                    if next_epoch < cfg.SOLVER.MAX_EPOCHS else "the run's last")
            log.info("Run %d/%d: resuming from %s: repeating the evaluation after epoch %d, %s, seed %d.",
                     run_index + 1, cfg.REPRODUCIBLE_NUM_RUNS, resume_path, next_epoch, then, seed)
        else:
            log.info("Run %d/%d: resuming from %s, continuing with epoch %d of %d, seed %d.", run_index + 1,
                     cfg.REPRODUCIBLE_NUM_RUNS, resume_path, next_epoch + 1, cfg.SOLVER.MAX_EPOCHS, seed)
    else:
        seed = run_seed(cfg, run_index)
    if not resume_path:
        check_start_weights(cfg)
    pl.seed_everything(seed, workers=True, verbose=False)
    log.info("Run %d/%d, seed %d, output %s", run_index + 1, cfg.REPRODUCIBLE_NUM_RUNS, seed, run_dir)

    if data is None:
        datamodule = ReIDDataModule(cfg, seed=seed)
        describe_data(datamodule)
    else:
        datamodule = data.for_run(cfg, seed)
    model = model_cls(cfg=cfg_to_dict(cfg), num_classes=datamodule.num_classes, seed=seed)
    if not resume_path and cfg.MODEL.PRETRAINED and cfg.MODEL.PRETRAIN_PATH:
        load_backbone_weights(model.model.backbone, cfg.MODEL.PRETRAIN_PATH, model_name=cfg.MODEL.NAME)
        log.info("Loaded backbone weights from %s", cfg.MODEL.PRETRAIN_PATH)
    elif not resume_path and cfg.MODEL.PRETRAINED:
        log.warning("MODEL.PRETRAINED is True but MODEL.PRETRAIN_PATH is empty: training %s from scratch.",
                    cfg.MODEL.NAME)
    check_checkpoint_space(model, run_dir)
    trainer = build_trainer(cfg, run_dir, max_epochs=cfg.SOLVER.MAX_EPOCHS)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path, weights_only=True)
    # If fit evaluated no final epoch (resuming a finished run trains none), evaluate now.
    if model.last_metrics is None or model.last_metrics["epochs_trained"] != trainer.current_epoch:
        trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = model.last_metrics
    if trainer.is_global_zero:
        atomic_write_text(os.path.join(run_dir, "DONE"), json.dumps({"seed": seed}) + "\n")
        best = trainer.checkpoint_callback
        score = ""
        if best is not None and best.best_model_score is not None:
            score = f" (best {best.monitor} {float(best.best_model_score):.4f})"
        log.info("Run %d/%d done: metrics.json, checkpoints/last.ckpt and checkpoints/best.ckpt%s in %s",
                 run_index + 1, cfg.REPRODUCIBLE_NUM_RUNS, score, run_dir)
    return metrics


def run_only_test(model_cls: type[ModelBase], cfg, out_dir: str, checkpoint: dict) -> dict:
    """Evaluate the checkpoint MODEL.PRETRAIN_PATH in both modes (``cfg``: from `only_test_config`)
    and write ``OUTPUT_DIR/metrics.json``."""
    path = cfg.MODEL.PRETRAIN_PATH
    state = checkpoint["state_dict"]
    num_classes = int(checkpoint["hyper_parameters"]["num_classes"])
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = out_dir
    cfg.freeze()
    datamodule = ReIDDataModule(cfg, seed=0)
    log.info("%s", datamodule.splits.summary())
    model = model_cls(cfg=cfg_to_dict(cfg), num_classes=num_classes, seed=0)
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise WeightsError(f"Checkpoint {path} does not fit {model_cls.__name__} ({cfg.MODEL.NAME}): {problem}")
    model.load_state_dict(state)
    model.eval_context = {"checkpoint": os.path.abspath(path), "epochs_trained": int(checkpoint.get("epoch", -1)) + 1}
    # Its own TensorBoard folder: the training curves in tensorboard/ stay as the training run left them.
    trainer = build_trainer(cfg, out_dir, max_epochs=1, with_checkpoints=False, log_name="tensorboard_test")
    trainer.validate(model, datamodule=datamodule, verbose=False)
    return model.last_metrics


def only_test_config(cfg, checkpoint: dict, explicit: set[str]):
    """The config a TEST.ONLY_TEST run evaluates with: the architecture must match the checkpoint's,
    and the test-time settings (input size, pixel statistics, metric, normalisation) are the
    checkpoint's unless given as KEY VALUE pairs: the same numbers as training's last evaluation
    and the inference tools."""
    path = cfg.MODEL.PRETRAIN_PATH
    check_architecture(cfg, checkpoint, path)
    return checkpoint_config(checkpoint, cfg, explicit, path)


def summarize_runs(all_metrics: Sequence[dict]) -> dict:
    summary: dict = {}
    for mode in [m for m in EVAL_MODES if all(m in run for run in all_metrics)]:
        summary[mode] = {k: float(np.mean([m[mode][k] for m in all_metrics])) for k in METRIC_KEYS}
        # the sample standard deviation (n - 1), as results over a few seeds are reported
        summary[mode + "_std"] = {k: float(np.std([m[mode][k] for m in all_metrics], ddof=1)) for k in METRIC_KEYS}
    summary["runs"] = list(all_metrics)
    return summary


def run(model_cls: type[ModelBase], cfg, explicit: set[str] | None = None) -> dict:
    """Train, resume or (TEST.ONLY_TEST) evaluate as ``cfg`` says. explicit: the keys set on the
    command line (`explicit_keys`); the only ones that override a tested checkpoint's test-time settings."""
    out_dir = output_dir_of(cfg)
    check_accelerator(cfg)  # before the dataset is read (VERIFY_IMAGES decodes every image)
    check_output_dir(out_dir)  # writable; each training run checks the space its checkpoints need
    if cfg.TEST.ONLY_TEST:
        checkpoint = load_project_checkpoint(cfg.MODEL.PRETRAIN_PATH)
        cfg = only_test_config(cfg, checkpoint, explicit or set())
        # Train scripts reuse their OUTPUT_DIR for testing: keep what the training run wrote there.
        atomic_write_text(os.path.join(out_dir, "config_test.yaml"), cfg.dump())
        # An unreadable metrics.json may be the training run's too: it is moved aside, not overwritten.
        previous = os.path.join(out_dir, "metrics.json")
        metrics = read_metrics(previous)
        if os.path.isfile(previous) and (metrics is None or written_by_training(metrics)):
            os.replace(previous, os.path.join(out_dir, "metrics_training.json"))
            log.info("Kept the training run's metrics as %s/metrics_training.json", out_dir)
        return run_only_test(model_cls, cfg, out_dir, checkpoint)
    warn_about_schedule(cfg)
    if not cfg.MODEL.RESUME_TRAINING:
        check_no_earlier_training(out_dir)
    runs = cfg.REPRODUCIBLE_NUM_RUNS
    if cfg.MODEL.RESUME_TRAINING and cfg.MODEL.PRETRAIN_PATH and runs > 1:
        raise ConfigError("MODEL.RESUME_TRAINING with a MODEL.PRETRAIN_PATH resumes one run: set "
                          "REPRODUCIBLE_NUM_RUNS 1 (or leave PRETRAIN_PATH empty to resume every run in OUTPUT_DIR).")
    if not cfg.MODEL.RESUME_TRAINING:
        check_start_weights(cfg)  # before the data is read: VERIFY_IMAGES may take minutes
    # The data is read, checked and described once, whatever the number of runs, before anything is written.
    data = ReIDDataModule(cfg)
    describe_data(data)
    # A resume keeps the configuration the run was started with; its own goes beside it.
    started = os.path.join(out_dir, "config.yaml")
    start_weights = ""
    if cfg.MODEL.RESUME_TRAINING and os.path.isfile(started):
        start_weights = started_weights(started) if not cfg.MODEL.PRETRAIN_PATH else ""
        atomic_write_text(os.path.join(out_dir, "config_resume.yaml"), cfg.dump())
    else:
        atomic_write_text(started, cfg.dump())
    all_metrics = []
    for index in range(runs):
        run_dir = out_dir if runs == 1 else os.path.join(out_dir, f"run_{index}")
        all_metrics.append(train_one_run(model_cls, cfg, run_dir, index, start_weights=start_weights,
                                         data=data))
    if runs == 1:
        return all_metrics[0]
    summary = summarize_runs(all_metrics)
    atomic_write_text(os.path.join(out_dir, "metrics.json"), json.dumps(summary, indent=2) + "\n")
    log.info("Mean ± sample std over %d runs: standard mAP %.2f%% ± %.2f, centroid mAP %.2f%% ± %.2f", runs,
             100 * summary["standard"]["mAP"], 100 * summary["standard_std"]["mAP"],
             100 * summary["centroid"]["mAP"], 100 * summary["centroid_std"]["mAP"])
    return summary


def user_message(err: Exception) -> str:
    """The message of ``err`` as the user needs it. An error raised in a DataLoader worker process (an
    image that became unreadable during training) is raised again in the main process with the worker's
    whole traceback in its message; its last line, the original message, names the file."""
    message = str(err)
    original = f"{type(err).__module__}.{type(err).__qualname__}: "
    if message.startswith("Caught ") and "\nOriginal Traceback" in message and original in message:
        return message.rsplit(original, 1)[1].strip()
    return message


def main(model_cls: type[ModelBase], argv: Sequence[str] | None, description: str) -> int:
    setup_logging()
    try:
        cfg, args = parse_cli(argv, description)
        run(model_cls, cfg, explicit_keys(args.opts))
    except (ConfigError, DatasetError, WeightsError, RunError) as err:
        log.error("%s", user_message(err))
        return 2
    return 0
