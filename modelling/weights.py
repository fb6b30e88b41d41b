"""Safe loading of weight files: ImageNet backbones, IBN-a weights, and this project's checkpoints.

Every file goes through ``torch.load(..., weights_only=True)``: a crafted pickle cannot run code.
Nothing here downloads anything.
"""
from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from config import cfg_from_dict

log = logging.getLogger(__name__)

# Keys of heads that never belong to a backbone (ImageNet fc, our BNNeck and classifier, ...).
_HEAD_PREFIXES = ("fc.", "classifier.", "bottleneck.", "bnneck.", "center_loss.", "reduce_embeddings.",
                  "transformer.")
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "base.")


class WeightsError(RuntimeError):
    """A weight file that is missing, unsafe, or does not fit the model; the message says which."""


def safe_load(path: str, *, what: str = "MODEL.PRETRAIN_PATH", mmap: bool = False) -> dict:
    """Load a checkpoint or state dict without executing pickled code. mmap: map the tensors' storage
    instead of reading it (cheap when only the metadata is needed); files in torch's old, non-zip
    format are read in full."""
    if not path:
        raise WeightsError(f"{what} is empty; give the path of a local weight file.")
    if os.path.isdir(path):
        raise WeightsError(f"{what} {path} is a folder: give the weight file inside it (a run's checkpoints are "
                           "checkpoints/last.ckpt and checkpoints/best.ckpt).")
    if not os.path.isfile(path):
        raise WeightsError(f"{what} file not found: {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not (mmap and "mmap" in str(err)):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = next((line for line in str(err).splitlines() if line.strip()), "")
        raise WeightsError(
            f"Cannot load {path} safely: it is not a PyTorch weight file, or it holds Python objects other "
            f"than tensors and plain containers (files are read with weights_only=True, so pickled code never "
            f"runs). torch said: {first_line}") from err
    except Exception as err:  # a truncated zip, a text file, ...
        raise WeightsError(f"{path} is not a PyTorch weight file: {type(err).__name__}: {err}") from err
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint.")
    return dict(obj)


# Config keys that fix a checkpoint's network: a checkpoint only loads into a model with the same values.
# GEM_P and GEM_P_LEARNED are not among them: the state dict holds p itself.
ARCHITECTURE_KEYS = ("MODEL.NAME", "MODEL.BACKBONE_EMB_SIZE", "MODEL.LAST_STRIDE", "MODEL.STEM_RELU", "MODEL.POOLING")
# Test-time settings a checkpoint records (what its model was evaluated with during training). TEST.ONLY_TEST
# and the inference tools use the checkpoint's values unless a KEY VALUE pair sets them, so the two agree.
TEST_TIME_KEYS = ("INPUT.SIZE_TEST", "INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD", "SOLVER.DISTANCE_FUNC", "TEST.FEAT_NORM",
                  "TEST.NECK_FEAT", "TEST.FLIP_FEATS")


def explicit_keys(opts: Sequence[str]) -> set[str]:
    """The config keys that the command line's ``KEY VALUE`` pairs set: only these override what a
    checkpoint decides. A config file (typically the training recipe, e.g. configs/256_resnet50.yml)
    sets every key; taken as the user's choice it would clash with any checkpoint of another backbone
    or input size."""
    return set(opts[0::2])


def _get(cfg, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def check_architecture(cfg, checkpoint: dict, path: str) -> None:
    """A WeightsError naming every ARCHITECTURE_KEYS value in which ``cfg`` and the checkpoint differ
    (resume and TEST.ONLY_TEST: the run's config must describe the checkpoint's network)."""
    saved = cfg_from_dict(checkpoint["hyper_parameters"]["cfg"])  # a key older checkpoints lack: its default
    differ = []
    for key in ARCHITECTURE_KEYS:
        theirs = _get(saved, key)
        if theirs != _get(cfg, key):
            differ.append(f"{key}: checkpoint {theirs!r} vs config {_get(cfg, key)!r}")
    if differ:
        raise WeightsError(f"Checkpoint {path} is of another model: " + "; ".join(differ))


def checkpoint_config(checkpoint: dict, user_cfg, explicit: set[str], path: str = ""):
    """The effective config for using ``checkpoint``: ``user_cfg`` with the checkpoint's architecture
    and, unless ``explicit`` names them, its test-time settings (TEST_TIME_KEYS). An explicit
    architecture key that differs is a WeightsError; each setting that changes is logged."""
    saved = cfg_from_dict(checkpoint["hyper_parameters"]["cfg"])
    cfg = user_cfg.clone()
    cfg.defrost()
    for key in ARCHITECTURE_KEYS:
        if key in explicit and _get(user_cfg, key) != _get(saved, key):
            raise WeightsError(f"{key} is {_get(user_cfg, key)!r} in the config but the checkpoint {path} holds a "
                               f"{_get(saved, key)!r} model; drop the key (the checkpoint decides the architecture).")
        _set(cfg, key, _get(saved, key))
    for key in TEST_TIME_KEYS:
        mine, theirs = _get(cfg, key), _get(saved, key)
        if key not in explicit:
            if mine != theirs:
                log.info("%s %s from the checkpoint (the config says %s; set it as KEY VALUE to use another).",
                         key, theirs, mine)
            _set(cfg, key, theirs)
        elif mine != theirs:
            log.warning("%s = %s differs from the checkpoint's %s (what the model was evaluated with).",
                        key, mine, theirs)
    cfg.freeze()
    return cfg


def load_project_checkpoint(path: str, *, what: str = "MODEL.PRETRAIN_PATH", mmap: bool = False) -> dict:
    """A checkpoint written by train_ctl_model.py / train_baseline.py, read with ``weights_only=True``
    (mmap: see ``safe_load``)."""
    checkpoint = safe_load(path, what=what, mmap=mmap)
    if not is_project_checkpoint(checkpoint):
        sample = ", ".join(list(checkpoint)[:4])
        raise WeightsError(
            f"{what} {path} is not a checkpoint of this project: it has no saved training config "
            f"(top-level keys: {sample or 'none'}). TEST.ONLY_TEST, MODEL.RESUME_TRAINING and the inference "
            "tools need a .ckpt written by train_ctl_model.py or train_baseline.py; ImageNet weights go in "
            "MODEL.PRETRAIN_PATH of a new training run.")
    return checkpoint


def is_project_checkpoint(obj: Mapping) -> bool:
    hparams = obj.get("hyper_parameters")
    return isinstance(hparams, Mapping) and "cfg" in hparams and "state_dict" in obj


def backbone_state(obj: Mapping) -> dict[str, torch.Tensor]:
    """The backbone tensors of a state dict or checkpoint, with wrapper prefixes and heads removed."""
    state = obj.get("state_dict", obj)
    if any(k.startswith("model.backbone.") for k in state):  # a checkpoint of this project
        return {k[len("model.backbone."):]: v for k, v in state.items() if k.startswith("model.backbone.")}
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        stripped = key
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if stripped.startswith(prefix):
                    stripped, changed = stripped[len(prefix):], True
        if not stripped.startswith(_HEAD_PREFIXES):
            out[stripped] = value
    return out


def describe_mismatch(model_state: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor],
                      limit: int = 15) -> str | None:
    """None when the keys and shapes line up, else a message listing missing/unexpected/mismatched keys."""
    expected = {k: v for k, v in model_state.items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in loaded.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
                         for k in set(expected) & set(given) if given[k].shape != expected[k].shape)
    if not (missing or unexpected or wrong_shape):
        return None
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", wrong_shape)):
        if items:
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_backbone_weights(backbone: nn.Module, path: str, *, model_name: str = "") -> None:
    """Copy the backbone weights in ``path`` into ``backbone``; any key mismatch is an error."""
    state = backbone_state(safe_load(path))
    adapt = getattr(backbone, "adapt_pretrained_state", None)
    if adapt is not None:  # a backbone whose published weights use another key layout renames them here
        state = adapt(state)
    problem = describe_mismatch(backbone.state_dict(), state)
    if problem:
        raise WeightsError(f"MODEL.PRETRAIN_PATH {path} does not fit backbone {model_name or type(backbone).__name__}: "
                           f"{problem}")
    backbone.load_state_dict(state, strict=False)  # num_batches_tracked may be absent from old files
