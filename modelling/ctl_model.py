"""The CTL model: the baseline's losses plus the centroid triplet loss (reference section 5.5)."""
from __future__ import annotations

import torch

from losses import centroid_triplet_loss

from .bases import ModelBase


class CTLModel(ModelBase):
    model_type = "ctl"

    def compute_losses(self, features: torch.Tensor, pids: torch.Tensor, is_real: torch.Tensor):
        losses, extras = super().compute_losses(features, pids, is_real)
        solver = self.cfg.SOLVER
        ctl = centroid_triplet_loss(features, pids, is_real, num_instances=self.cfg.DATALOADER.NUM_INSTANCE,
                                    margin=solver.MARGIN, distance=solver.DISTANCE_FUNC,
                                    soft_margin=solver.TRIPLET_SOFT_MARGIN)
        losses["centroid_triplet"] = solver.CENTROID_CONTRASTIVE_WEIGHT * ctl.loss
        extras.update(centroid_dist_ap=ctl.dist_ap, centroid_dist_an=ctl.dist_an, l2_mean_centroid=ctl.centroid_l2)
        return losses, extras
