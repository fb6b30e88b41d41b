"""Models: the embedding network, its backbones, and the LightningModules that train it."""
from .bases import ModelBase
from .ctl_model import CTLModel

MODEL_TYPES = {"baseline": ModelBase, "ctl": CTLModel}

__all__ = ["ModelBase", "CTLModel", "MODEL_TYPES"]
