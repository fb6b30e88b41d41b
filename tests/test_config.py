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
    with pytest.raises(ConfigError, match=r"MODEL\.BACKBONE_EMB_SIZE = 2048.*512"):
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
    values = {"SOLVER.BASE_LR": "1e-4", "SOLVER.MIN_LR": "1E-7", "OUTPUT_DIR": "2024_11_27",
              "DATASETS.ROOT_DIR": "0x10", "MODEL.PRETRAIN_PATH": "1.50", "SOLVER.MAX_EPOCHS": "1_20",
              "GPU_IDS": "[0, 1]", "TEST.ONLY_TEST": "no"}
    if source == "yaml":
        lines = []
        for key, value in values.items():
            *nodes, leaf = key.split(".")
            lines.append("".join(f"{node}:\n  " for node in nodes) + f"{leaf}: {value}")
        path = tmp_path / "typed.yml"
        path.write_text("\n".join(lines) + "\n")
        cfg = load_config(str(path), validate=False)
    else:
        cfg = load_config(opts=[x for pair in values.items() for x in pair], validate=False)
    assert cfg.SOLVER.BASE_LR == 1e-4 and cfg.SOLVER.MIN_LR == 1e-7
    assert (cfg.OUTPUT_DIR, cfg.DATASETS.ROOT_DIR, cfg.MODEL.PRETRAIN_PATH) == ("2024_11_27", "0x10", "1.50")
    assert cfg.SOLVER.MAX_EPOCHS == 120 and cfg.GPU_IDS == [0, 1] and cfg.TEST.ONLY_TEST is False


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
