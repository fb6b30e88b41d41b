"""Config loading: defaults < YAML file < ``KEY VALUE`` pairs, validated once at start-up.

Every entry point calls :func:`parse_cli` (or :func:`load_config`); a wrong key or value raises
:class:`ConfigError` whose message names the key and what is allowed.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
from typing import Any, Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN

from .defaults import get_cfg_defaults

__all__ = ["ConfigError", "get_cfg_defaults", "load_config", "parse_cli", "validate_config",
           "cfg_to_dict", "cfg_from_dict", "build_arg_parser", "flatten_items"]

_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}
# Keys that hold a file or folder path: a leading ~ is expanded (os.path.expanduser) from any source.
_PATH_KEYS = ("MODEL.PRETRAIN_PATH", "DATASETS.ROOT_DIR", "DATASETS.JSON_TRAIN_PATH", "DATASETS.JSON_QUERY_PATH",
             "DATASETS.JSON_GALLERY_PATH", "TEST.WEIGHT", "LOG_DIR", "OUTPUT_DIR")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""


def _all_keys(node: CN, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        full = f"{prefix}{name}"
        keys.extend(_all_keys(value, full + ".") if isinstance(value, CN) else [full])
    return keys


def _unknown_key(cfg: CN, full_key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(full_key, _all_keys(cfg), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else " See the config table in README.md."
    return ConfigError(f"Unknown config key {full_key} (from {source}).{hint}")


def _coerce(full_key: str, default: Any, value: Any, source: str) -> Any:
    """Return ``value`` converted to the type of ``default``, or raise a ConfigError naming the key."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"Config key {full_key} (from {source}) expects {expected}, got {value!r}.")

    # Values from YAML files and the command line arrive as text (see _TextLoader) and are
    # read here by the type of the default; values from a checkpoint's config are typed.
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise bad("True or False")
    if isinstance(default, int):
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if isinstance(default, float):
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if isinstance(default, str):
        if value is None:
            return ""  # YAML null (~, null or nothing after the colon): an empty string
        if isinstance(value, str):
            return value  # as written: "2024_11_27" or "1.50" stay what they say
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if isinstance(default, (list, tuple)):
        if isinstance(value, str):
            value = _load_text(value, full_key, source)
        if not isinstance(value, (list, tuple)):
            raise bad("a list such as [1, 2]")
        if default:
            return [_coerce(f"{full_key}[{i}]", default[0], item, source) for i, item in enumerate(value)]
        return list(value)
    raise bad(type(default).__name__)


def _set_key(cfg: CN, full_key: str, value: Any, source: str) -> None:
    node = cfg
    parts = full_key.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], CN):
            raise _unknown_key(cfg, full_key, source)
        node = node[part]
    leaf = parts[-1]
    if leaf not in node or isinstance(node[leaf], CN):
        raise _unknown_key(cfg, full_key, source)
    value = _coerce(full_key, node[leaf], value, source)
    node[leaf] = os.path.expanduser(value) if full_key in _PATH_KEYS else value


def _set_keys(cfg: CN, items: Iterable[tuple[str, Any]], source: str) -> None:
    """``_set_key`` for every item; one ConfigError lists every unknown key or bad value of ``source``."""
    errors = []
    for key, value in items:
        try:
            _set_key(cfg, key, value, source)
        except ConfigError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigError(f"{len(errors)} config keys from {source} cannot be used:\n  - "
                          + "\n  - ".join(str(err) for err in errors))


def flatten_items(mapping: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for name, value in mapping.items():
        if isinstance(value, dict):
            yield from flatten_items(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


class _TextLoader(yaml.SafeLoader):
    """YAML whose plain scalars all stay text: `_coerce` reads each by its key's type.

    YAML 1.1 alone would turn `1e-4` into a string (its floats need a dot), `2024_11_27`
    into the integer 20241127 and a bare `on` into True. Only null (`~`, `null`, nothing)
    is still read as None: an empty string for a string key, a type error for the others.
    """


_KEPT_TAGS = ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:null")
_TextLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in _KEPT_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _duplicate_keys(node: yaml.Node, prefix: str = "", seen: dict | None = None) -> list[str]:
    """'KEY at line N (first at line M)' for each key given twice: in one mapping, or once nested
    and once dotted (``SOLVER: {BASE_LR: ..}`` and ``SOLVER.BASE_LR: ..``)."""
    seen = {} if seen is None else seen
    found = []
    if not isinstance(node, yaml.MappingNode):
        return found
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        full, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if full in seen:
            found.append(f"{full} at line {line} (first at line {seen[full]})")
        else:
            seen[full] = line
        found += _duplicate_keys(value_node, full + ".", seen)
    return found


def _load_text(text: str, full_key: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_TextLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"Config key {full_key} (from {source}): cannot read {text!r}: {err}") from err


def _number(text: str) -> Any:
    """int or float of a number written as text ("35", "3.5e-4", "1e-4", "2_000"), else the text."""
    for convert in (int, float):
        try:
            return convert(text.strip())
        except ValueError:
            pass
    return text


def merge_file(cfg: CN, path: str) -> None:
    """Merge a YAML file into ``cfg`` (unknown keys and wrong types raise ConfigError)."""
    if not os.path.isfile(path):
        raise ConfigError(f"Config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        duplicates = _duplicate_keys(yaml.compose(text, Loader=_TextLoader))  # noqa: S506 (SafeLoader)
        data = yaml.load(text, Loader=_TextLoader) or {}  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from err
    if duplicates:  # YAML would silently keep the last one (a second SOLVER: block replaces the first)
        raise ConfigError(f"Config file {path} gives a key twice: " + "; ".join(duplicates)
                          + ". Keep one of each.")
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys, got {type(data).__name__}.")
    _set_keys(cfg, flatten_items(data), source=path)


def merge_pairs(cfg: CN, opts: Sequence[str]) -> None:
    """Merge ``KEY VALUE`` pairs from the command line."""
    if len(opts) % 2:
        raise ConfigError(f"Command-line overrides must be KEY VALUE pairs; {opts[-1]!r} has no value.")
    _set_keys(cfg, zip(opts[0::2], opts[1::2]), source="command line")


def _check(errors: list[str], ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        errors.append(f"{key} = {value!r} is not allowed; allowed: {allowed}.")


def validate_config(cfg: CN) -> None:
    """Check values that types alone cannot; raise one ConfigError listing every problem."""
    from datasets import COMBINABLE, DATASET_REGISTRY, dataset_names  # late imports: the registries import config
    from modelling.backbones import BACKBONES
    from datasets.samplers import MOCK_IMAGES
    from modelling.pooling import POOLINGS

    e: list[str] = []

    def one_of(key: str, value: Any, choices: Iterable) -> None:
        choices = list(choices)
        _check(e, value in choices, key, value, ", ".join(repr(c) for c in choices))

    def at_least(key: str, value: Any, low: float) -> None:
        _check(e, value >= low, key, value, f">= {low}")

    def finite_at_least(key: str, value: float, low: float) -> None:
        _check(e, math.isfinite(value) and value >= low, key, value, f"a finite number >= {low}")

    one_of("MODEL.NAME", cfg.MODEL.NAME, BACKBONES)
    if cfg.MODEL.NAME in BACKBONES:
        expected = BACKBONES[cfg.MODEL.NAME].feat_dim
        _check(e, cfg.MODEL.BACKBONE_EMB_SIZE == expected, "MODEL.BACKBONE_EMB_SIZE", cfg.MODEL.BACKBONE_EMB_SIZE,
               f"{expected}, the output size of MODEL.NAME {cfg.MODEL.NAME!r} (set the two together)")
    one_of("MODEL.LAST_STRIDE", cfg.MODEL.LAST_STRIDE, (1, 2))
    names = dataset_names(cfg)
    if len(names) <= 1:
        one_of("DATASETS.NAMES", names[0] if names else cfg.DATASETS.NAMES, DATASET_REGISTRY)
    else:
        _check(e, len(set(names)) == len(names) and all(name in COMBINABLE for name in names), "DATASETS.NAMES",
               cfg.DATASETS.NAMES, f"one of {', '.join(DATASET_REGISTRY)}, or distinct names among "
               f"{', '.join(COMBINABLE)} separated by commas to train on their union (each reads its own folder "
               "under DATASETS.ROOT_DIR; two of the others would read the same data)")
    if cfg.DATASETS.TEST_NAME.strip():
        one_of("DATASETS.TEST_NAME", cfg.DATASETS.TEST_NAME.strip(), DATASET_REGISTRY)
    one_of("DATASETS.ON_BAD_ANNOTATION", cfg.DATASETS.ON_BAD_ANNOTATION, ("error", "skip"))
    one_of("DATALOADER.SAMPLER", cfg.DATALOADER.SAMPLER, ("random_identity",))
    at_least("DATALOADER.NUM_INSTANCE", cfg.DATALOADER.NUM_INSTANCE, 2)
    at_least("DATALOADER.NUM_WORKERS", cfg.DATALOADER.NUM_WORKERS, -1)
    for key in ("SIZE_TRAIN", "SIZE_TEST"):
        size = cfg.INPUT[key]
        _check(e, len(size) == 2 and min(size) >= 8, f"INPUT.{key}", size, "[height, width], each >= 8")
    for key in ("PROB", "RE_PROB", "AUTOAUGMENT_PROB"):
        _check(e, 0.0 <= cfg.INPUT[key] <= 1.0, f"INPUT.{key}", cfg.INPUT[key], "a probability in [0, 1]")
    # The transforms normalise tensors already scaled to 0..1 (ToTensor / uint8 / 255).
    for key, positive, allowed in (("PIXEL_MEAN", False, "3 numbers in [0, 1] (RGB, 0..1 scale)"),
                                   ("PIXEL_STD", True, "3 numbers in (0, 1] (RGB, 0..1 scale)")):
        values = list(cfg.INPUT[key])
        if any(v > 1 for v in values):
            allowed += "; values on the 0-255 scale must be divided by 255"
        in_range = all((v > 0 if positive else v >= 0) and v <= 1 for v in values)
        _check(e, len(values) == 3 and in_range, f"INPUT.{key}", values, allowed)
    at_least("INPUT.PADDING", cfg.INPUT.PADDING, 0)
    # Fast-path switches; "auto" is resolved in datasets.gpu_augment.resolve_fast_path.
    switches = ("auto", "on", "off")
    one_of("MODEL.POOLING", cfg.MODEL.POOLING, POOLINGS)
    one_of("TEST.NECK_FEAT", cfg.TEST.NECK_FEAT, ("after", "before"))
    one_of("DATALOADER.MOCK_IMAGES", cfg.DATALOADER.MOCK_IMAGES, MOCK_IMAGES)
    finite_at_least("MODEL.GEM_P", cfg.MODEL.GEM_P, 1.0)
    one_of("MODEL.CHANNELS_LAST", cfg.MODEL.CHANNELS_LAST, switches)
    one_of("MODEL.COMPILE", cfg.MODEL.COMPILE, switches)
    one_of("SOLVER.FUSED_OPTIMIZER", cfg.SOLVER.FUSED_OPTIMIZER, switches)
    one_of("DATALOADER.GPU_AUGMENT", cfg.DATALOADER.GPU_AUGMENT, switches)
    one_of("DATALOADER.CACHE_IMAGES", cfg.DATALOADER.CACHE_IMAGES, switches)
    one_of("PROGRESS_BAR", cfg.PROGRESS_BAR, switches)
    at_least("DATALOADER.PREFETCH_FACTOR", cfg.DATALOADER.PREFETCH_FACTOR, 1)
    at_least("DATALOADER.CACHE_MAX_GB", cfg.DATALOADER.CACHE_MAX_GB, 0.0)
    if cfg.DATALOADER.CACHE_IMAGES == "on":
        # The cache holds resized uint8 images, which only the device augmentation consumes.
        _check(e, cfg.DATALOADER.GPU_AUGMENT != "off", "DATALOADER.GPU_AUGMENT", cfg.DATALOADER.GPU_AUGMENT,
               "'auto' or 'on' together with DATALOADER.CACHE_IMAGES 'on'")

    s = cfg.SOLVER
    one_of("SOLVER.OPTIMIZER_NAME", s.OPTIMIZER_NAME, ("Adam", "AdamW"))
    one_of("SOLVER.DISTANCE_FUNC", s.DISTANCE_FUNC, ("euclidean", "cosine"))
    one_of("SOLVER.LR_SCHEDULER_NAME", s.LR_SCHEDULER_NAME, ("multistep_lr", "cosine_annealing"))
    one_of("SOLVER.MONITOR_METRIC_MODE", s.MONITOR_METRIC_MODE, ("max", "min"))
    one_of("SOLVER.DIST_BACKEND", s.DIST_BACKEND, ("ddp", "ddp_spawn", "ddp_find_unused_parameters_true"))
    _check(e, s.USE_AUTOMATIC_OPTIM is False, "SOLVER.USE_AUTOMATIC_OPTIM", s.USE_AUTOMATIC_OPTIM,
           "False (the training steps use manual optimisation)")
    at_least("SOLVER.MAX_EPOCHS", s.MAX_EPOCHS, 1)
    at_least("SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH, 2)
    at_least("SOLVER.EVAL_PERIOD", s.EVAL_PERIOD, 1)
    at_least("SOLVER.CHECKPOINT_PERIOD", s.CHECKPOINT_PERIOD, 1)
    at_least("SOLVER.MAX_ITERS_PER_EPOCH", s.MAX_ITERS_PER_EPOCH, 0)
    at_least("SOLVER.MARGIN", s.MARGIN, 0.0)
    for key in ("QUERY_XENT_WEIGHT", "QUERY_CONTRASTIVE_WEIGHT", "CENTROID_CONTRASTIVE_WEIGHT",
                "CENTER_LOSS_WEIGHT"):  # the loss weights (modelling.bases, modelling.ctl_model)
        finite_at_least(f"SOLVER.{key}", s[key], 0.0)
    at_least("SOLVER.WEIGHT_DECAY", s.WEIGHT_DECAY, 0.0)
    at_least("SOLVER.MIN_LR", s.MIN_LR, 0.0)
    _check(e, math.isfinite(s.BASE_LR) and s.BASE_LR > 0, "SOLVER.BASE_LR", s.BASE_LR, "a finite number > 0")
    if s.LR_SCHEDULER_NAME == "cosine_annealing":  # the only schedule that uses MIN_LR (modelling.schedule)
        _check(e, s.MIN_LR <= s.BASE_LR, "SOLVER.MIN_LR", s.MIN_LR,
               f"<= SOLVER.BASE_LR ({s.BASE_LR!r}), the rate the cosine schedule decays from")
    _check(e, 0 < s.GAMMA <= 1, "SOLVER.GAMMA", s.GAMMA,
           "0 < GAMMA <= 1 (it multiplies the learning rate at each of SOLVER.LR_STEPS)")
    _check(e, s.CENTER_LR > 0, "SOLVER.CENTER_LR", s.CENTER_LR, "> 0")
    if s.USE_WARMUP_LR:
        at_least("SOLVER.WARMUP_EPOCHS", s.WARMUP_EPOCHS, 1)
    _check(e, list(s.LR_STEPS) == sorted(set(s.LR_STEPS)) and all(step > 0 for step in s.LR_STEPS),
           "SOLVER.LR_STEPS", s.LR_STEPS, "strictly increasing positive epochs")
    metrics = ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20", "rank50")  # as logged by modelling.bases
    monitorable = metrics + tuple(f"centroid_{name}" for name in metrics)
    one_of("SOLVER.MONITOR_METRIC_NAME", s.MONITOR_METRIC_NAME, monitorable)
    if s.MONITOR_METRIC_NAME in monitorable:  # all higher-is-better
        _check(e, s.MONITOR_METRIC_MODE != "min", "SOLVER.MONITOR_METRIC_MODE", s.MONITOR_METRIC_MODE,
               f"'max' for SOLVER.MONITOR_METRIC_NAME {s.MONITOR_METRIC_NAME!r}, which is higher-is-better "
               "('min' would keep the worst checkpoint)")

    at_least("TEST.IMS_PER_BATCH", cfg.TEST.IMS_PER_BATCH, 1)
    at_least("TEST.VISUALIZE_TOPK", cfg.TEST.VISUALIZE_TOPK, 1)
    at_least("TEST.QUERY_EXPANSION_K", cfg.TEST.QUERY_EXPANSION_K, 0)
    finite_at_least("TEST.QUERY_EXPANSION_ALPHA", cfg.TEST.QUERY_EXPANSION_ALPHA, 0.0)
    at_least("TEST.VISUALIZE_MAX_NUMBER", cfg.TEST.VISUALIZE_MAX_NUMBER, 1)
    one_of("ACCELERATOR", cfg.ACCELERATOR, ("auto", "gpu", "cuda", "cpu"))
    at_least("DEVICES", cfg.DEVICES, 0)
    at_least("NUM_NODES", cfg.NUM_NODES, 1)
    one_of("MIXED_PRECISION_DTYPE", cfg.MIXED_PRECISION_DTYPE, ("bf16", "fp16"))
    at_least("REPRODUCIBLE_NUM_RUNS", cfg.REPRODUCIBLE_NUM_RUNS, 1)
    # Run i is seeded with REPRODUCIBLE_SEED + i (utils.run.run_seed); numpy takes 0 .. 2**32 - 1.
    last_seed = 2**32 - max(cfg.REPRODUCIBLE_NUM_RUNS, 1)
    _check(e, 0 <= cfg.REPRODUCIBLE_SEED <= last_seed, "REPRODUCIBLE_SEED", cfg.REPRODUCIBLE_SEED,
           f"0 <= seed and seed + REPRODUCIBLE_NUM_RUNS - 1 <= 2**32 - 1 (numpy's seed range; run i uses "
           f"seed + i), i.e. 0 .. {last_seed} with REPRODUCIBLE_NUM_RUNS {cfg.REPRODUCIBLE_NUM_RUNS}")
    gpu_ids = list(cfg.GPU_IDS)
    _check(e, all(isinstance(i, int) and i >= 0 for i in gpu_ids), "GPU_IDS", gpu_ids,
           "a list of GPU indices such as [0] or [0, 1]")
    _check(e, len(set(gpu_ids)) == len(gpu_ids), "GPU_IDS", gpu_ids, "distinct GPU indices such as [0, 1]")
    # DEVICES > 0 overrides GPU_IDS on the GPU (utils.run.resolve_devices); on the CPU GPU_IDS is unused.
    if gpu_ids and gpu_ids != list(get_cfg_defaults().GPU_IDS) and cfg.DEVICES > 0 and cfg.ACCELERATOR != "cpu":
        _check(e, cfg.DEVICES == len(gpu_ids), "DEVICES", cfg.DEVICES,
               f"0 or {len(gpu_ids)} (the length of GPU_IDS {gpu_ids}); DEVICES > 0 overrides GPU_IDS, "
               "so give only one of them")
    if cfg.TEST.ONLY_TEST:
        _check(e, bool(cfg.MODEL.PRETRAIN_PATH), "MODEL.PRETRAIN_PATH", cfg.MODEL.PRETRAIN_PATH,
               "a checkpoint path when TEST.ONLY_TEST is True")
        _check(e, not cfg.MODEL.RESUME_TRAINING, "MODEL.RESUME_TRAINING", True,
               "False together with TEST.ONLY_TEST")
    if e:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(e))


def load_config(config_file: str | None = None, opts: Sequence[str] = (), *, validate: bool = True) -> CN:
    """Defaults, then ``config_file``, then ``opts``; validated and frozen."""
    cfg = get_cfg_defaults()
    if config_file:
        merge_file(cfg, config_file)
    merge_pairs(cfg, list(opts))
    if validate:
        validate_config(cfg)
    cfg.freeze()
    return cfg


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="After the options, give any number of KEY VALUE pairs, e.g. SOLVER.BASE_LR 3.5e-4 "
               "DATASETS.ROOT_DIR /data. Every key is listed in README.md.")
    parser.add_argument("--config_file", "--config-file", default="", help="YAML file with config overrides")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs that override the file")
    return parser


def parse_cli(argv: Sequence[str] | None, description: str,
              parser: argparse.ArgumentParser | None = None) -> tuple[CN, argparse.Namespace]:
    """Parse ``--config_file=FILE KEY VALUE ...`` into a validated config (and the argparse namespace)."""
    parser = parser or build_arg_parser(description)
    args = parser.parse_args(argv)
    # argparse hands every token after the first KEY to opts, options included.
    for i, token in enumerate(args.opts):
        where_key = i % 2 == 0
        if token.startswith("--") and (where_key or token.split("=", 1)[0] in parser._option_string_actions):
            raise ConfigError(f"Command-line option {token!r} follows the KEY VALUE pairs: options such as "
                              "--config_file must come before the KEY VALUE pairs.")
    return load_config(args.config_file or None, args.opts), args


def cfg_to_dict(cfg: CN) -> dict:
    """Plain nested dicts/lists (safe to store in a checkpoint loaded with weights_only=True)."""
    return {k: cfg_to_dict(v) if isinstance(v, CN) else (list(v) if isinstance(v, tuple) else v)
            for k, v in cfg.items()}


def cfg_from_dict(data: dict, *, validate: bool = False) -> CN:
    """Rebuild a config from :func:`cfg_to_dict` output (keys unknown to this version are an error)."""
    cfg = get_cfg_defaults()
    _set_keys(cfg, flatten_items(data), source="checkpoint")
    if validate:
        validate_config(cfg)
    cfg.freeze()
    return cfg
