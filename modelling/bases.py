"""The LightningModule shared by the baseline and the CTL model.

It owns the network (:class:`ReIDModel`), the center loss and its SGD optimiser, the learning-rate
schedule, and evaluation: validation collects post-BN embeddings of query+gallery, then one call of
``utils.eval_reid.evaluate`` per mode gives the standard and centroid metrics, which are logged,
printed and written to ``OUTPUT_DIR/metrics.json``. A training variant subclasses it and overrides
:meth:`compute_losses` only.
"""
from __future__ import annotations

import json
import logging
import os
import warnings

import pytorch_lightning as pl
import torch
from torch import nn

from config import cfg_from_dict
from datasets import test_dataset_name
from datasets.gpu_augment import FastPath, apply_augment_params, draw_augment_params, resolve_fast_path
from losses import CenterLoss, batch_hard_triplet_loss, label_smoothing_cross_entropy
from utils.eval_reid import evaluate, format_metrics, query_expansion
from utils.io import atomic_write_text

from .baseline import ReIDModel
from .pooling import GeneralizedMeanPooling
from .schedule import lr_at_epoch

log = logging.getLogger(__name__)

METRIC_KEYS = ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20", "rank50")
# The rows an evaluation reports, in order: the last two only with TEST.RE_RANKING / TEST.QUERY_EXPANSION_K.
EVAL_MODES = ("standard", "centroid", "standard_reranked", "standard_qe")

# Lightning notes on every fit with a data module that the module's batch-transfer hooks are used: intended.
warnings.filterwarnings("ignore", message=r".*overridden `on_(after|before)_batch_transfer` in `LightningModule`")


def compile_in_place(module: nn.Module, *, for_gpu: bool) -> bool:
    """``torch.compile`` ``module`` in place (state-dict keys unchanged); False, with a warning, if unavailable.

    Compilation itself happens at the first forward; should it fail there, dynamo's ``suppress_errors``
    makes that module run eagerly (with dynamo's own warning) instead of ending the run.
    """
    reason = None
    try:
        from torch import _dynamo as dynamo
        from torch.utils._triton import has_triton
    except ImportError as err:
        reason = f"torch.compile cannot be imported ({err})"
    else:
        if not hasattr(module, "compile"):
            reason = "this torch has no nn.Module.compile"
        elif not dynamo.is_dynamo_supported():
            reason = "torch.compile does not support this Python or platform"
        elif for_gpu and not has_triton():
            reason = "Triton (needed to compile for the GPU) is not installed"
    if reason is None:
        try:
            dynamo.config.suppress_errors = True
            module.compile()
            return True
        except Exception as err:  # backend set-up problems vary by platform
            reason = f"{type(err).__name__}: {err}"
    log.warning("MODEL.COMPILE: not compiling the backbone, %s. Training continues uncompiled.", reason)
    return False


class ModelBase(pl.LightningModule):
    """Baseline (BoT-style) training: batch-hard triplet + center loss + label-smoothed CE.

    Args (all plain values, saved in the checkpoint and loadable with ``weights_only=True``):
        cfg: the run's config as a nested dict (``config.cfg_to_dict``).
        num_classes: number of training identities (classifier and center-loss size).
        seed: the run's seed (the PK sampler's shuffle is a function of it and the epoch).
    """

    model_type = "baseline"

    def __init__(self, cfg: dict, num_classes: int, seed: int = 0):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg, "num_classes": num_classes, "seed": seed,
                                   "model_type": self.model_type})
        self.cfg = cfg_from_dict(cfg)
        self.automatic_optimization = False
        self.model = ReIDModel(self.cfg, num_classes)
        self.center_loss = CenterLoss(num_classes, self.model.feat_dim)
        self._eval_features: list[torch.Tensor] = []
        self._eval_indices: list[torch.Tensor] = []
        self.last_metrics: dict | None = None
        self.eval_context: dict = {}  # extra entries for metrics.json (e.g. the evaluated checkpoint)
        self.bar_loss: torch.Tensor | None = None  # the last step's loss, on the device, for the progress bar
        self.channels_last = False  # set by setup("fit") from MODEL.CHANNELS_LAST
        self._augment_generator: torch.Generator | None = None  # device augmentation draws; reseeded per epoch

    # ------------------------------------------------------------------ fast path
    def fast_path(self) -> FastPath:
        """The resolved fast-path switches (the same call as the data module's, so both agree)."""
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else self.device
        splits = getattr(getattr(trainer, "datamodule", None), "splits", None)
        return resolve_fast_path(self.cfg, use_gpu=device.type == "cuda",
                                 train_images=len(splits.train) if splits is not None else 0)

    def setup(self, stage: str) -> None:
        # Before Lightning moves the model to the device, wraps it for DDP and builds the optimisers.
        if stage != "fit":
            return
        fast = self.fast_path()
        log.info("Fast path: %s", fast.describe())
        if fast.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.channels_last = True
        if fast.compile:
            compile_in_place(self.model.backbone, for_gpu=self.trainer.strategy.root_device.type == "cuda")

    def augment_on_device(self, images: torch.Tensor, is_real: torch.Tensor) -> torch.Tensor:
        """Resized uint8 train images (B, 3, H, W) -> augmented, normalised float32, on their device."""
        inp = self.cfg.INPUT
        if self._augment_generator is None:
            self._seed_augmentation(epoch=0)
        params = draw_augment_params(images.shape[0], images.shape[-2:], flip_prob=inp.PROB, padding=inp.PADDING,
                                     erase_prob=inp.RE_PROB, generator=self._augment_generator)
        return apply_augment_params(images, params.to(images.device), padding=inp.PADDING, mean=inp.PIXEL_MEAN,
                                    std=inp.PIXEL_STD, is_real=is_real)

    def _seed_augmentation(self, epoch: int) -> None:
        # A function of (run seed, epoch, rank): ranks draw differently, and a resumed epoch draws as before.
        rank = self._trainer.global_rank if self._trainer is not None else 0
        seed = (int(self.hparams.seed) * 1_000_003 + epoch) * 1009 + rank
        self._augment_generator = torch.Generator().manual_seed(seed % 2**63)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, *rest = batch
        if images.dtype == torch.uint8:  # the fast train loader: augment here, as batched ops on the device
            # Blank mock images stay all-zero after normalisation, as the PIL path makes them; copies do not.
            blank = rest[2] if self.cfg.DATALOADER.MOCK_IMAGES == "zeros" else None
            images = self.augment_on_device(images, blank)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (images, *rest)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        solver = self.cfg.SOLVER
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("center_loss.")]
        # GeM's exponent is a shape parameter of the pooling (>= 1 makes sense), not a weight to shrink to 0.
        groups = [{"params": [p for n, p in named if n != "model.pool.p"]}]
        no_decay = [p for n, p in named if n == "model.pool.p"]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optim_cls = torch.optim.AdamW if solver.OPTIMIZER_NAME == "AdamW" else torch.optim.Adam
        if self.fast_path().fused_optimizer:
            extra = {"fused": True}
        else:
            extra = {"foreach": True} if self.device.type == "cuda" else {}
        main = optim_cls(groups, lr=lr_at_epoch(0, solver), weight_decay=solver.WEIGHT_DECAY, **extra)
        centers = torch.optim.SGD(self.center_loss.parameters(), lr=solver.CENTER_LR)
        return [main, centers]

    def on_train_epoch_start(self) -> None:
        self._seed_augmentation(self.current_epoch)
        lr = lr_at_epoch(self.current_epoch, self.cfg.SOLVER)
        for group in self.optimizers()[0].optimizer.param_groups:
            group["lr"] = lr
        self.log("lr", lr, on_step=False, on_epoch=True)
        if isinstance(self.model.pool, GeneralizedMeanPooling):  # GeM's exponent as this epoch starts
            self.log("gem_p", float(self.model.pool.p.detach()), on_step=False, on_epoch=True)

    def compute_losses(self, features: torch.Tensor, pids: torch.Tensor, is_real: torch.Tensor | None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Pre-BN features (B, D) -> (weighted losses to sum, extra values to log).

        is_real: (B,) bool, False for mock images; None when every image is real. Training passes
        the loader's host tensor: every selection is then derived on the host and its index lists
        copied asynchronously, so no loss makes a GPU step wait for the device (a mask on the
        device works too, at the cost of such waits).
        """
        solver = self.cfg.SOLVER
        features = features.float()  # bf16 under autocast: means (centroids, centers) and distances in fp32
        triplet, d_ap, d_an = batch_hard_triplet_loss(
            features, pids, margin=solver.MARGIN, distance=solver.DISTANCE_FUNC,
            soft_margin=solver.TRIPLET_SOFT_MARGIN, anchor_mask=is_real, candidate_mask=is_real)
        if is_real is None:
            real_features, real_pids = features, pids
        else:
            rows = is_real.cpu().nonzero().squeeze(1).to(features.device, non_blocking=True)
            real_features, real_pids = features.index_select(0, rows), pids.index_select(0, rows)
        xent = label_smoothing_cross_entropy(self.model.classify(real_features), real_pids)
        losses = {
            "query_triplet": solver.QUERY_CONTRASTIVE_WEIGHT * triplet,
            "query_xent": solver.QUERY_XENT_WEIGHT * xent,
            "query_center": solver.CENTER_LOSS_WEIGHT * self.center_loss(real_features, real_pids),
        }
        return losses, {"dist_ap": d_ap, "dist_an": d_an}

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer.training:
            # The mock flags as the loader made them, on the host: a batch without mocks skips every
            # masked selection, and the losses derive the others' selections there (see compute_losses).
            is_real = batch[3]
            self._host_is_real = None if bool(is_real.all()) else is_real.cpu()
        return batch

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, pids, _camids, is_real = batch
        is_real = self.__dict__.pop("_host_is_real", is_real)  # set for this batch only
        optimizer, center_optimizer = self.optimizers()
        optimizer.zero_grad()
        center_optimizer.zero_grad()
        features = self.model(images)
        losses, extras = self.compute_losses(features, pids, is_real)
        total = torch.stack(list(losses.values())).sum()
        self.manual_backward(total)
        weight = self.cfg.SOLVER.CENTER_LOSS_WEIGHT
        # fp16: Lightning's step unscales and then updates the loss scale, per optimizer, so a second
        # step would unscale the centers with the scale the network's step has just changed.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if weight > 0:
            # The centers learn from the unweighted center loss (BoT): undo the weight on their
            # gradient, and under fp16 the loss scale too, before the network's step changes it.
            # (unscale_ divides on the device: get_scale() would be a host sync every step.)
            if scaler is not None:
                scaler.unscale_(center_optimizer.optimizer)
            for param in self.center_loss.parameters():
                if param.grad is not None:
                    param.grad.mul_(1.0 / weight)
                    if scaler is not None:  # an overflow skips the step (SGD without decay: a zero gradient)
                        param.grad.copy_(torch.where(param.grad.isfinite().all(), param.grad, 0.0))
        optimizer.step()
        if weight > 0:
            # Under fp16 the plain torch step: its gradient is unscaled already.
            (center_optimizer.step if scaler is None else center_optimizer.optimizer.step)()
        batch_size = images.shape[0]
        # Not prog_bar: Lightning reads every prog_bar step value back to the host after each batch
        # (a GPU sync per step). The bar shows `bar_loss` when it refreshes (utils.run.LossProgressBar).
        self.bar_loss = total.detach()
        self.log("train_loss", self.bar_loss, on_step=True, on_epoch=True, batch_size=batch_size)
        for name, value in {**losses, **extras}.items():
            self.log(name, value.detach(), on_step=False, on_epoch=True, batch_size=batch_size)
        return total.detach()

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._eval_features, self._eval_indices = [], []
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            # Each rank's BatchNorm running statistics drift apart after the last training step; the
            # checkpoint holds rank 0's, so every rank embeds with rank 0's.
            for buffer in self.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, _pids, _camids, indices = batch
        self._eval_features.append(self.model.embed(images).float())
        self._eval_indices.append(indices.to(self.device))

    def _gathered_features(self) -> torch.Tensor:
        """Post-BN features of every query+gallery image, in dataset order, each exactly once."""
        dm = self.trainer.datamodule
        total = len(dm.eval_records)
        dim = self.model.feat_dim
        features = torch.cat(self._eval_features) if self._eval_features else torch.zeros(0, dim, device=self.device)
        indices = torch.cat(self._eval_indices) if self._eval_indices else torch.zeros(0, dtype=torch.long,
                                                                                     device=self.device)
        world = self.trainer.world_size
        if world > 1:
            # Shards are contiguous and of known sizes: pad to the largest, gather once, trim.
            longest = max(len(dm.eval_shard(r, world)) for r in range(world))
            pad = longest - features.shape[0]
            features = torch.cat([features, features.new_zeros(pad, dim)])
            indices = torch.cat([indices, indices.new_full((pad,), -1)])
            features = self.all_gather(features).reshape(-1, dim)
            indices = self.all_gather(indices).reshape(-1)
            keep = indices >= 0
            features, indices = features[keep], indices[keep]
        if indices.numel() != total or torch.unique(indices).numel() != total:
            raise RuntimeError(f"Evaluation collected {indices.numel()} features for {total} images; "
                               "each query and gallery image must be embedded exactly once.")
        order = torch.argsort(indices)
        return features[order]

    def evaluate_features(self, features: torch.Tensor) -> dict[str, dict]:
        """Standard and centroid metrics (plus raw results) for query+gallery features in dataset order."""
        dm = self.trainer.datamodule
        num_query = dm.num_query
        pids = torch.tensor([r.pid for r in dm.eval_records])
        camids = torch.tensor([r.camid for r in dm.eval_records])
        test = self.cfg.TEST
        common = dict(metric=self.cfg.SOLVER.DISTANCE_FUNC, feat_norm=test.FEAT_NORM,
                      camera_aware=self.cfg.MODEL.KEEP_CAMID_CENTROIDS)
        args = (features[:num_query], features[num_query:], pids[:num_query], pids[num_query:],
                camids[:num_query], camids[num_query:])
        topk = test.VISUALIZE_TOPK if test.VISUALIZE else 0
        results = {"standard": evaluate(*args, use_centroids=False, return_topk=topk, **common),
                   "centroid": evaluate(*args, use_centroids=True, return_topk=topk, **common)}
        if test.RE_RANKING:  # an extra row: re-ranking applies to the standard mode only
            results["standard_reranked"] = evaluate(*args, use_centroids=False, rerank=True, return_topk=topk,
                                                    **common)
        if test.QUERY_EXPANSION_K:  # an extra row, also of the standard mode: expanded queries, normalised features
            query, gallery = query_expansion(args[0], args[1], test.QUERY_EXPANSION_K, test.QUERY_EXPANSION_ALPHA)
            results["standard_qe"] = evaluate(query, gallery, *args[2:], use_centroids=False, return_topk=topk,
                                              **{**common, "feat_norm": True})
        return results

    def _visualize(self, results: dict) -> None:
        """Ranked lists per query for every mode, an index.html, and the CMC curves, under OUTPUT_DIR."""
        from utils.visrank import plot_cmc_curve, visualize_ranked_results, write_index

        dm = self.trainer.datamodule
        query, gallery = dm.eval_records[:dm.num_query], dm.eval_records[dm.num_query:]
        out_dir = self.cfg.OUTPUT_DIR
        for mode, result in results.items():
            visualize_ranked_results(
                result, [r.path for r in query], [r.path for r in gallery], [r.pid for r in query],
                [r.pid for r in gallery], [r.camid for r in query], [r.camid for r in gallery], out_dir,
                topk=self.cfg.TEST.VISUALIZE_TOPK, max_queries=self.cfg.TEST.VISUALIZE_MAX_NUMBER,
                image_size=tuple(self.cfg.INPUT.SIZE_TEST), mode_name=mode, update_index=False)
        write_index(os.path.join(out_dir, "visrank"), modes=list(results))  # not a mode of an earlier run
        plot_cmc_curve({mode: result["cmc"] for mode, result in results.items()},
                       os.path.join(out_dir, "cmc_curve.png"))
        log.info("Ranked lists written to %s", os.path.join(out_dir, "visrank", "index.html"))

    def on_validation_epoch_end(self) -> None:
        features = self._gathered_features()
        self._eval_features, self._eval_indices = [], []
        metrics = None
        if self.trainer.is_global_zero:
            results = self.evaluate_features(features)
            metrics = {mode: format_metrics(result) for mode, result in results.items()}
            if self.cfg.TEST.VISUALIZE and self.cfg.OUTPUT_DIR:
                self._visualize(results)
            fitting = self.trainer.state.fn == "fit"
            metrics["epochs_trained"] = self.current_epoch + 1 if fitting else self.current_epoch
            metrics.update(self.eval_context)
            self._report(metrics)
        metrics = self.trainer.strategy.broadcast(metrics, src=0)
        self.last_metrics = metrics
        for key in METRIC_KEYS:
            self.log(key, metrics["standard"][key], sync_dist=False)
            self.log(f"centroid_{key}", metrics["centroid"][key], sync_dist=False)

    def _report(self, metrics: dict) -> None:
        lines = [f"Evaluation after {metrics['epochs_trained']} epoch(s) ({test_dataset_name(self.cfg)}):",
                 f"  {'mode':<17} " + " ".join(f"{k:>7}" for k in METRIC_KEYS)]
        for mode in [m for m in EVAL_MODES if m in metrics]:
            lines.append(f"  {mode:<17} " + " ".join(f"{100 * metrics[mode][k]:6.2f}%" for k in METRIC_KEYS))
        log.info("\n".join(lines))
        out_dir = self.cfg.OUTPUT_DIR
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            atomic_write_text(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
