"""Scale-out and robustness: DDP on CPU, SIGKILL + resume, config fuzzing, vanishing files, disk checks."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import ConfigError, cfg_to_dict, get_cfg_defaults, load_config
from conftest import ROOT, tiny_opts

# ----------------------------------------------------------------------------- config fuzzing

def _leaf_keys():
    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"
    return sorted(walk(cfg_to_dict(get_cfg_defaults())))


KEYS = _leaf_keys()
VALUES = st.one_of(
    st.integers(-5, 300).map(str), st.floats(-2, 2, allow_nan=False).map(repr), st.booleans().map(str),
    st.sampled_from(["resnet18", "cosine", "euclidean", "yes", "abc", "", "[1, 2]", "[]", "[64, 32]", "None",
                     "cosine_annealing", "multistep_lr", "bf16", "cpu", "market1501", "street2shop", "{'a': 1}"]))
KEY_NAMES = st.one_of(st.sampled_from(KEYS), st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_.", min_size=1, max_size=20))


def preflight(cfg):
    """What training builds from the config before the first batch, on fake data (no files)."""
    import torch

    from datasets.samplers import PKBatchSampler
    from datasets.transforms import build_transforms
    from modelling.backbones import BACKBONES
    from modelling.schedule import lr_at_epoch

    build_transforms(cfg, is_train=True)(__import__("PIL.Image").Image.new("RGB", (20, 40)))
    build_transforms(cfg, is_train=False)
    lrs = [lr_at_epoch(e, cfg.SOLVER) for e in range(cfg.SOLVER.MAX_EPOCHS)]
    assert all(lr >= 0 and lr == lr for lr in lrs)
    pids = {p: list(range(p * 6, p * 6 + 6)) for p in range(cfg.SOLVER.IMS_PER_BATCH + 2)}
    next(iter(PKBatchSampler(pids, p=cfg.SOLVER.IMS_PER_BATCH, k=cfg.DATALOADER.NUM_INSTANCE, seed=0)))
    assert BACKBONES[cfg.MODEL.NAME].feat_dim == cfg.MODEL.BACKBONE_EMB_SIZE
    torch.zeros(1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KEY_NAMES, VALUES), min_size=1, max_size=3))
def test_random_overrides_either_work_or_name_the_key(pairs):
    opts = [item for pair in pairs for item in pair]
    try:
        cfg = load_config(opts=opts)
    except ConfigError as err:
        message = str(err)
        assert any(key in message for key, _ in pairs) or "pairs" in message, message
        return
    cfg_small = cfg.clone()
    cfg_small.defrost()
    cfg_small.SOLVER.MAX_EPOCHS = min(cfg.SOLVER.MAX_EPOCHS, 300)
    preflight(cfg_small)


# ----------------------------------------------------------------------------- files and disk

def test_image_deleted_after_indexing_names_the_file(synthetic_root, tmp_path):
    from datasets.datamodule import ReIDDataModule

    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    cfg = load_config(opts=tiny_opts(str(root), str(tmp_path / "out"), **{"DATALOADER.NUM_WORKERS": 2}))
    datamodule = ReIDDataModule(cfg, seed=0)
    victim = datamodule.splits.query[0].path
    os.remove(victim)
    start = time.time()
    with pytest.raises(Exception, match=os.path.basename(victim)):
        for _ in datamodule.val_dataloader():
            pass
    assert time.time() - start < 60


def test_unreadable_image_in_a_loader_worker_is_logged_as_its_message_alone(tmp_path):
    # With DATALOADER.NUM_WORKERS > 0 (the default) the error came back wrapped in the worker's two
    # tracebacks, 40 lines with the file name on the last one.
    from torch.utils.data import DataLoader

    from datasets import DatasetError
    from datasets.bases import ImageRecord
    from datasets.datamodule import ImageDataset
    from utils.run import user_message

    bad = tmp_path / "0001_c1s1_000001_00.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 cut off")
    loader = DataLoader(ImageDataset([ImageRecord(str(bad), 1, 0)], lambda image: image), num_workers=1,
                        collate_fn=list)
    with pytest.raises(DatasetError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # how torch hands it back
    assert re.fullmatch(rf"Cannot read image {re.escape(str(bad))}: \w+: [^\n]+", user_message(caught.value))
    assert user_message(DatasetError("two\nlines")) == "two\nlines"  # others pass unchanged


def test_low_disk_space_is_found_at_start(synthetic_root, tmp_path, monkeypatch, caplog):
    import shutil

    from modelling.ctl_model import CTLModel
    from utils import run as run_module

    monkeypatch.setattr(run_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1024))
    assert run_module.main(CTLModel, ["--config_file=", *tiny_opts(synthetic_root, str(tmp_path))], "") == 2
    assert "MiB free" in caplog.text and not os.path.exists(tmp_path / "checkpoints")


# ----------------------------------------------------------------------------- subprocess runs

def _train_cmd(opts, entry="train_ctl_model.py"):
    return [sys.executable, os.path.join(ROOT, entry), "--config_file=", *opts]


def _env():
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _metrics(path):
    with open(os.path.join(path, "metrics.json")) as handle:
        return json.load(handle)


def test_ddp_two_cpu_processes_match_single_process_test(synthetic_root, tmp_path):
    """Two runs with random seeds (REPRODUCIBLE False): in each, both ranks use rank 0's seed (rank 1
    is started during the first run's fit, so it used to draw its own seed for the second run),
    and the gathered evaluation equals a single-process test of the final checkpoint."""
    out = str(tmp_path / "ddp")
    opts = tiny_opts(synthetic_root, out, **{"ACCELERATOR": "cpu", "DEVICES": 2, "SOLVER.MAX_EPOCHS": 1,
                                             "SOLVER.IMS_PER_BATCH": 4, "REPRODUCIBLE": False,
                                             "REPRODUCIBLE_NUM_RUNS": 2})
    done = subprocess.run(_train_cmd(opts), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sync_dist" not in done.stdout + done.stderr  # Lightning's advice, repeated per value: see setup_logging
    shared = re.findall(r"Rank (\d)/2: PK sampler seed (\d+)", done.stdout + done.stderr)
    seeds = [json.load(open(os.path.join(out, f"run_{i}", "DONE")))["seed"] for i in range(2)]
    assert sorted(shared) == sorted([(str(rank), str(seed)) for seed in seeds for rank in range(2)]), shared
    ddp = _metrics(os.path.join(out, "run_1"))
    assert ddp["epochs_trained"] == 1
    test_out = str(tmp_path / "single")
    test_opts = tiny_opts(synthetic_root, test_out, **{
        "TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": os.path.join(out, "run_1", "checkpoints", "last.ckpt"),
        "SOLVER.IMS_PER_BATCH": 4})
    done = subprocess.run(_train_cmd(test_opts), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single = _metrics(test_out)
    for mode in ("standard", "centroid"):
        for key, value in ddp[mode].items():
            assert single[mode][key] == pytest.approx(value, abs=1e-6), (mode, key)


def test_sigkill_mid_epoch_then_resume_finishes(synthetic_root, tmp_path):
    out = str(tmp_path / "run")
    opts = tiny_opts(synthetic_root, out, **{"SOLVER.MAX_EPOCHS": 4, "SOLVER.EVAL_PERIOD": 10})
    last = os.path.join(out, "checkpoints", "last.ckpt")
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(_train_cmd(opts), cwd=ROOT, env=_env(), stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        # wait for the checkpoint of epoch 0, then for epoch 1 to be under way, then kill hard
        while time.time() < deadline and not os.path.exists(last):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        assert os.path.exists(last), "no checkpoint was written"
        time.sleep(1.0)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    import torch

    saved_epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert saved_epoch < 3
    resume = opts + ["MODEL.RESUME_TRAINING", "True"]
    done = subprocess.run(_train_cmd(resume), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"continuing with epoch {saved_epoch + 2} of 4" in done.stdout  # where it resumed (1-based)
    assert _metrics(out)["epochs_trained"] == 4
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3


def test_log_lines_do_not_glue_onto_an_open_progress_bar():
    """The evaluation table is logged while Lightning's bar is open: the line must start on a line of its own."""
    import io
    import logging

    from tqdm import tqdm

    from utils.run import _ProgressBarSafeHandler

    stream = io.StringIO()
    handler = _ProgressBarSafeHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    bar = tqdm(total=3, file=stream, ascii=True, bar_format="{n}/{total}")
    bar.update(1)
    handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "Evaluation after 1 epoch(s)", None, None))
    bar.close()
    text = stream.getvalue()
    # A plain StreamHandler writes "\r0/3Evaluation after ...": the message glued onto the bar's text.
    assert "/3Evaluation" not in text
    assert text.split("Evaluation")[0].endswith("\r   \r")  # the bar line was blanked first
    assert text.endswith("1/3\n")  # and the bar redrawn after the message

    class Writes(io.StringIO):
        def write(self, text):
            self.calls = getattr(self, "calls", []) + [text]
            return super().write(text)

    shared = Writes()  # DDP ranks share stdout: a line and its newline must be one write, or lines interleave
    logging_handler = _ProgressBarSafeHandler(shared)
    logging_handler.setFormatter(logging.Formatter("%(message)s"))
    logging_handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "Rank 0/2: seed 5", None, None))
    assert "Rank 0/2: seed 5\n" in shared.calls
