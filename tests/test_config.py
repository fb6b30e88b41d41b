"""Config merge and validation: every bad key or value fails at start-up, naming the key."""
import os

import pytest

from config import ConfigError, cfg_from_dict, cfg_to_dict, load_config
from conftest import ROOT


def test_defaults_validate_and_hold_original_keys():
    cfg = load_config()
    assert cfg.SOLVER.IMS_PER_BATCH == 64 and cfg.DATALOADER.NUM_INSTANCE == 4
    assert cfg.SOLVER.LR_STEPS == [40, 70] and cfg.SOLVER.MARGIN == 0.5
    assert cfg.MODEL.KEEP_CAMID_CENTROIDS is True and cfg.GPU_IDS == [0]


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"SOLVER\.BASE_LRR.*Did you mean SOLVER\.BASE_LR"):
        load_config(opts=["SOLVER.BASE_LRR", "0.1"])


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"SOLVER\.DISTANCE_FUNC = 'cosin'.*'euclidean', 'cosine'"):
        load_config(opts=["SOLVER.DISTANCE_FUNC", "cosin"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"SOLVER\.MAX_EPOCHS.*integer"):
        load_config(opts=["SOLVER.MAX_EPOCHS", "ten"])


def test_backbone_size_must_match_backbone():
    # the message names the key the user gave as well as the one that no longer fits it
    with pytest.raises(ConfigError, match=r"MODEL\.BACKBONE_EMB_SIZE = 2048 .*512, the output size of MODEL\.NAME "
                                          r"'resnet18'"):
        load_config(opts=["MODEL.NAME", "resnet18"])


def test_several_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(opts=["INPUT.PROB", "1.5", "DATALOADER.NUM_INSTANCE", "1"])
    assert "INPUT.PROB" in str(info.value) and "DATALOADER.NUM_INSTANCE" in str(info.value)


def test_coercions_int_to_float_and_yes_no():
    cfg = load_config(opts=["SOLVER.BASE_LR", "1", "TEST.VISUALIZE", "yes", "INPUT.PIXEL_MEAN", "[0, 0.5, 1]"])
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    assert cfg.TEST.VISUALIZE is True
    assert cfg.INPUT.PIXEL_MEAN == [0.0, 0.5, 1.0]


def test_odd_pairs_rejected():
    with pytest.raises(ConfigError, match="no value"):
        load_config(opts=["SOLVER.BASE_LR"])


def test_yaml_unknown_key_names_file(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("SOLVER:\n  NOT_A_KEY: 3\n")
    with pytest.raises(ConfigError, match=r"SOLVER\.NOT_A_KEY.*bad\.yml"):
        load_config(str(path))


def test_shipped_configs_load():
    for name in ("configs/256_resnet50.yml", "configs/320_resnet50_ibn_a.yml", "configs/demo.yml"):
        cfg = load_config(os.path.join(ROOT, name))
        assert cfg.MODEL.NAME


def test_only_test_needs_checkpoint():
    with pytest.raises(ConfigError, match="MODEL.PRETRAIN_PATH"):
        load_config(opts=["TEST.ONLY_TEST", "True"])


def test_dict_round_trip_is_plain():
    cfg = load_config(opts=["SOLVER.BASE_LR", "0.002"])
    data = cfg_to_dict(cfg)
    assert type(data) is dict and type(data["SOLVER"]) is dict
    assert cfg_from_dict(data) == cfg


def test_readme_lists_every_config_key_as_in_defaults():
    from config.table import config_rows, markdown_table, readme_path, readme_table

    with open(readme_path(), encoding="utf-8") as handle:
        assert readme_table(handle.read()) == markdown_table(), "run: python -m config.table --update-readme"
    from config.defaults import get_cfg_defaults
    from config import cfg_to_dict

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    assert sorted(k for k, _, _ in config_rows()) == sorted(leaves(cfg_to_dict(get_cfg_defaults())))


def test_yaml_bare_on_off_reach_auto_on_off_keys(tmp_path):
    path = tmp_path / "fast.yml"
    path.write_text("MODEL:\n  CHANNELS_LAST: on\n  COMPILE: off\n")
    cfg = load_config(str(path))
    assert (cfg.MODEL.CHANNELS_LAST, cfg.MODEL.COMPILE) == ("on", "off")


@pytest.mark.parametrize("source", ["yaml", "command line"])
def test_values_are_read_by_the_type_of_their_key(tmp_path, source):
    """YAML 1.1 reads 1e-4 as a string and 2024_11_27 as the integer 20241127; ast read 0x10
    as 16. Each value must mean what it says for its key's type."""
    values = {"SOLVER.BASE_LR": "2e-4", "SOLVER.MIN_LR": "3E-7", "OUTPUT_DIR": "2024_11_27",
              "DATASETS.ROOT_DIR": "0x10", "MODEL.PRETRAIN_PATH": "1.50", "SOLVER.MAX_EPOCHS": "1_50",
              "GPU_IDS": "[0, 1]", "TEST.ONLY_TEST": "no"}
    if source == "yaml":
        sections: dict = {}  # one block per section: a repeated SOLVER: block is an error
        for key, value in values.items():
            section, _, leaf = key.rpartition(".")
            sections.setdefault(section, []).append(f"{'  ' if section else ''}{leaf}: {value}")
        text = "".join((f"{section}:\n" if section else "") + "\n".join(lines) + "\n"
                       for section, lines in sections.items())
        path = tmp_path / "typed.yml"
        path.write_text(text)
        cfg = load_config(str(path), validate=False)
    else:
        cfg = load_config(opts=[x for pair in values.items() for x in pair], validate=False)
    assert cfg.SOLVER.BASE_LR == 2e-4 and cfg.SOLVER.MIN_LR == 3e-7
    assert (cfg.OUTPUT_DIR, cfg.DATASETS.ROOT_DIR, cfg.MODEL.PRETRAIN_PATH) == ("2024_11_27", "0x10", "1.50")
    assert cfg.SOLVER.MAX_EPOCHS == 150 and cfg.GPU_IDS == [0, 1] and cfg.TEST.ONLY_TEST is False


def test_unreadable_list_value_names_the_key():
    with pytest.raises(ConfigError, match=r"GPU_IDS \(from command line\)"):
        load_config(opts=["GPU_IDS", "[0,"])


def test_every_logged_metric_can_pick_the_best_checkpoint():
    from modelling.bases import METRIC_KEYS

    for key in METRIC_KEYS:
        for name in (key, f"centroid_{key}"):
            assert load_config(opts=["SOLVER.MONITOR_METRIC_NAME", name]).SOLVER.MONITOR_METRIC_NAME == name
    with pytest.raises(ConfigError, match="MONITOR_METRIC_NAME"):
        load_config(opts=["SOLVER.MONITOR_METRIC_NAME", "rank3"])


@pytest.mark.parametrize("key, values", [("INPUT.PIXEL_MEAN", "[123.7, 116.3, 103.5]"),
                                         ("INPUT.PIXEL_STD", "[58.4, 57.1, 57.4]")])
def test_pixel_values_on_the_255_scale_are_rejected(key, values):
    with pytest.raises(ConfigError, match=rf"{key} = \[{values[1:6]}.*0..1 scale.*0-255 scale must be divided by 255"):
        load_config(opts=[key, values])
    with pytest.raises(ConfigError, match=r"INPUT\.PIXEL_MEAN = \[-0\.1, 0\.5, 0\.5\].*\[0, 1\]") as info:
        load_config(opts=["INPUT.PIXEL_MEAN", "[-0.1, 0.5, 0.5]"])
    assert "255" not in str(info.value)
    assert load_config(opts=["INPUT.PIXEL_MEAN", "[0, 0.5, 1]", "INPUT.PIXEL_STD", "[1, 1, 1]"])


def test_reproducible_seed_fits_numpy_for_every_run():
    last = 2**32 - 3  # runs 0, 1, 2 use seed, seed + 1, seed + 2
    assert load_config(opts=["REPRODUCIBLE_SEED", str(last)]).REPRODUCIBLE_SEED == last
    assert load_config(opts=["REPRODUCIBLE_SEED", str(2**32 - 1), "REPRODUCIBLE_NUM_RUNS", "1"])
    for seed in (-1, last + 1):
        with pytest.raises(ConfigError, match=rf"REPRODUCIBLE_SEED = {seed} .*seed \+ REPRODUCIBLE_NUM_RUNS - 1 "
                                              rf"<= 2\*\*32 - 1.*0 \.\. {last} with REPRODUCIBLE_NUM_RUNS 3"):
            load_config(opts=["REPRODUCIBLE_SEED", str(seed)])


@pytest.mark.parametrize("opts, message", [
    (["SOLVER.GAMMA", "0"], r"SOLVER\.GAMMA = 0\.0 .*0 < GAMMA <= 1"),
    (["SOLVER.GAMMA", "10"], r"SOLVER\.GAMMA = 10\.0 .*0 < GAMMA <= 1"),
    (["SOLVER.BASE_LR", "inf"], r"SOLVER\.BASE_LR = inf .*a finite number > 0"),
    (["SOLVER.QUERY_XENT_WEIGHT", "-1"], r"SOLVER\.QUERY_XENT_WEIGHT = -1\.0 .*a finite number >= 0"),
    (["SOLVER.QUERY_CONTRASTIVE_WEIGHT", "inf"], r"SOLVER\.QUERY_CONTRASTIVE_WEIGHT = inf .*finite"),
    (["SOLVER.CENTROID_CONTRASTIVE_WEIGHT", "-0.5"], r"SOLVER\.CENTROID_CONTRASTIVE_WEIGHT = -0\.5 .*>= 0"),
    (["SOLVER.CENTER_LOSS_WEIGHT", "inf"], r"SOLVER\.CENTER_LOSS_WEIGHT = inf .*finite"),
    (["SOLVER.LR_SCHEDULER_NAME", "cosine_annealing", "SOLVER.MIN_LR", "0.01"],
     r"SOLVER\.MIN_LR = 0\.01 .*<= SOLVER\.BASE_LR \(0\.0001\)"),
])
def test_solver_rates_and_loss_weights(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_config(opts=opts)


def test_solver_edge_values_that_stay_allowed():
    # MIN_LR only matters to the cosine schedule; GAMMA 1 keeps the rate; a zero weight drops a loss.
    assert load_config(opts=["SOLVER.MIN_LR", "0.01", "SOLVER.GAMMA", "1", "SOLVER.QUERY_XENT_WEIGHT", "0"])
    assert load_config(opts=["SOLVER.LR_SCHEDULER_NAME", "cosine_annealing", "SOLVER.MIN_LR", "1e-4"])


@pytest.mark.parametrize("name", ["mAP", "mINP", "rank1", "rank50", "centroid_mAP", "centroid_rank5"])
def test_min_mode_on_a_higher_is_better_metric_is_rejected(name):
    with pytest.raises(ConfigError, match=rf"SOLVER\.MONITOR_METRIC_MODE = 'min' .*'max' for "
                                          rf"SOLVER\.MONITOR_METRIC_NAME '{name}'.*worst checkpoint"):
        load_config(opts=["SOLVER.MONITOR_METRIC_NAME", name, "SOLVER.MONITOR_METRIC_MODE", "min"])


def test_gpu_ids_distinct_and_consistent_with_devices():
    with pytest.raises(ConfigError, match=r"GPU_IDS = \[0, 0\] .*distinct"):
        load_config(opts=["GPU_IDS", "[0, 0]"])
    with pytest.raises(ConfigError, match=r"DEVICES = 3 .*0 or 2 \(the length of GPU_IDS \[0, 1\]\)"):
        load_config(opts=["GPU_IDS", "[0, 1]", "DEVICES", "3"])
    assert load_config(opts=["GPU_IDS", "[0, 1]", "DEVICES", "2"])
    # the default GPU_IDS (as the train_scripts pass it), none, or a CPU run: DEVICES alone decides
    recipe = os.path.join(ROOT, "configs", "256_resnet50.yml")
    assert load_config(recipe, ["GPU_IDS", "[0]", "ACCELERATOR", "gpu", "DEVICES", "8", "NUM_NODES", "2"])
    assert load_config(os.path.join(ROOT, "configs", "demo.yml"), ["ACCELERATOR", "cpu", "DEVICES", "2"])
    assert load_config(opts=["GPU_IDS", "[0, 1]", "ACCELERATOR", "cpu", "DEVICES", "3"])


def test_yaml_duplicated_keys_name_file_key_and_line(tmp_path):
    path = tmp_path / "twice.yml"
    path.write_text("SOLVER:\n  BASE_LR: 0.1\nMODEL:\n  NAME: resnet50\n  NAME: resnet18\n"
                    "SOLVER:\n  MAX_EPOCHS: 3\nINPUT.PROB: 0.1\nINPUT:\n  PROB: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    text = str(info.value)
    assert f"Config file {path} gives a key twice" in text
    assert "MODEL.NAME at line 5 (first at line 4)" in text and "SOLVER at line 6 (first at line 1)" in text
    assert "INPUT.PROB at line 10 (first at line 8)" in text


def test_yaml_null_is_an_empty_string_and_paths_expand_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home")
    path = tmp_path / "nulls.yml"
    path.write_text("OUTPUT_DIR: ~\nLOG_DIR:\nMODEL:\n  PRETRAIN_PATH: null\nDATASETS:\n  ROOT_DIR: ~/data\n"
                    "  JSON_TRAIN_PATH: '~/train.json'\n  NAMES: 'null'\n")
    cfg = load_config(str(path), validate=False)
    assert (cfg.OUTPUT_DIR, cfg.LOG_DIR, cfg.MODEL.PRETRAIN_PATH) == ("", "", "")
    assert cfg.DATASETS.ROOT_DIR == f"{home}/data" and cfg.DATASETS.JSON_TRAIN_PATH == f"{home}/train.json"
    assert cfg.DATASETS.NAMES == "null"  # quoted: the text itself
    cfg = load_config(opts=["OUTPUT_DIR", "~/runs", "MODEL.PRETRAIN_PATH", "~/w.pth"], validate=False)
    assert (cfg.OUTPUT_DIR, cfg.MODEL.PRETRAIN_PATH) == (f"{home}/runs", f"{home}/w.pth")
    path.write_text("SOLVER:\n  MAX_EPOCHS: ~\n")
    with pytest.raises(ConfigError, match=r"SOLVER\.MAX_EPOCHS .*expects an integer, got None"):
        load_config(str(path))


@pytest.mark.parametrize("argv", [["SOLVER.BASE_LR", "0.1", "--config_file", "configs/demo.yml"],
                                  ["SOLVER.BASE_LR", "0.1", "--config_file=configs/demo.yml"],
                                  ["OUTPUT_DIR", "--config_file", "configs/demo.yml"]])
def test_options_after_pairs_are_named(argv):
    from config import parse_cli

    with pytest.raises(ConfigError, match=r"'--config_file.*options such as --config_file must come "
                                          r"before the KEY VALUE pairs"):
        parse_cli(argv, "test")
    cfg, _ = parse_cli(["--config_file", os.path.join(ROOT, "configs", "demo.yml"), "SOLVER.BASE_LR", "0.1"], "t")
    assert cfg.SOLVER.BASE_LR == 0.1 and cfg.MODEL.NAME == "resnet18"


def test_every_unknown_key_of_a_file_reported_at_once(tmp_path):
    path = tmp_path / "typos.yml"
    path.write_text("SOLVER:\n  NOT_A_KEY: 3\n  BASE_LRR: 0.1\nMODEL:\n  NAMEE: resnet18\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    text = str(info.value)
    assert text.startswith(f"3 config keys from {path} cannot be used:")
    assert "SOLVER.NOT_A_KEY" in text and "MODEL.NAMEE" in text
    assert "Did you mean SOLVER.BASE_LR" in text and "Did you mean MODEL.NAME" in text
