"""Loss functions: pure, device-following, shapes in the docstrings."""
from .center_loss import CenterLoss
from .centroid_triplet_loss import CTLOutput, centroid_triplet_loss
from .cross_entropy import label_smoothing_cross_entropy
from .distances import DISTANCES, cosine_dist, euclidean_dist
from .triplet_loss import batch_hard_triplet_loss

__all__ = ["CenterLoss", "CTLOutput", "centroid_triplet_loss", "label_smoothing_cross_entropy", "DISTANCES",
           "cosine_dist", "euclidean_dist", "batch_hard_triplet_loss"]
