"""End-to-end CPU runs on tiny synthetic data: checkpoints, resume, repeated runs, logs, bad input.
(A trained run's learning and the evaluation of its checkpoint: test_trained_checkpoint.py.)"""
import json
import logging
import os
import re
import shutil
import signal

import pytest
import torch
import torchvision

from config import cfg_to_dict, load_config
from conftest import CUHK03P1, check_metrics_file, read_metrics, tiny_opts
from datasets.datamodule import ReIDDataModule
from modelling.bases import METRIC_KEYS, ModelBase
from modelling.ctl_model import CTLModel
from modelling.schedule import lr_at_epoch
from utils.history import read_history
from utils.run import build_trainer, evaluation_pending, main, summarize_runs


def test_training_steps_read_nothing_back_for_the_progress_bar(synthetic_root, tmp_path, monkeypatch, capsys):
    """Lightning turns every prog_bar step value into a Python float after each batch: on a GPU, a host
    sync per step. The bar shows the loss only when it refreshes (every 10 steps)."""
    from pytorch_lightning.trainer.connectors.logger_connector import result

    reads = []
    real = result.convert_tensors_to_scalars
    monkeypatch.setattr(result, "convert_tensors_to_scalars", lambda value: reads.append(1) or real(value))
    opts = tiny_opts(synthetic_root, str(tmp_path), **{"SOLVER.MAX_EPOCHS": 1, "SOLVER.EVAL_PERIOD": 5,
                                                        "PROGRESS_BAR": "on"})  # pytest's stdout is no terminal
    assert main(CTLModel, ["--config_file=", *opts], "") == 0
    assert len(reads) == 0
    assert re.search(r"Epoch 0: .*loss=\d+\.\d{3}", capsys.readouterr().out)


def test_without_a_terminal_each_epoch_is_one_log_line(synthetic_root, tmp_path, capsys, caplog, monkeypatch):
    """A batch job's log gets one line per epoch with the epoch's mean loss (as TensorBoard's
    train_loss_epoch), not a progress bar's redraws strung into one endless line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from utils.run import EpochLogLines

    monkeypatch.setattr(EpochLogLines.__init__, "__defaults__", (0.0,))  # a progress line after every step
    opts = tiny_opts(synthetic_root, str(tmp_path), **{"SOLVER.MAX_EPOCHS": 2, "SOLVER.MAX_ITERS_PER_EPOCH": 3})
    with caplog.at_level(logging.INFO):
        assert main(CTLModel, ["--config_file=", *opts], "") == 0
    assert re.findall(r"Epoch (\d)/2: step (\d)/3, loss \d+\.\d{3}, \d+ s so far", caplog.text) == [
        ("1", "1"), ("1", "2"), ("1", "3"), ("2", "1"), ("2", "2"), ("2", "3")]
    # each epoch's line (training time only) comes before its evaluation, and the run ends with a summary
    text = caplog.text
    for epoch in (1, 2):
        line = text.index(f"Epoch {epoch}/2: loss")
        assert line < text.index("Evaluating: embedding", line) < text.index(f"Evaluation after {epoch}", line)
        assert f"Evaluation after {epoch}" not in text[:line]
    assert re.search(r"Run 1/1 done: metrics.json, checkpoints/last.ckpt and checkpoints/best.ckpt \(best mAP "
                     r"0\.\d{4}\) in " + re.escape(str(tmp_path)), text)
    lines = re.findall(r"Epoch (\d)/2: loss (\d+\.\d{3}), 3 steps in [\d.]+ s \((\d+) images/s over 1 process\(es\)\), "
                       r"lr ([\d.e+-]+)", caplog.text)
    assert [int(epoch) for epoch, *_ in lines] == [1, 2]
    logged = [e.value for e in EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("train_loss_epoch")]
    assert [float(loss) for _, loss, _, _ in lines] == pytest.approx(logged, abs=6e-4)
    assert [float(lr) for *_, lr in lines] == pytest.approx([0.00035 / 2, 0.00035], rel=1e-3)  # 2 warmup epochs
    out = capsys.readouterr()
    assert "it/s" not in out.out + out.err  # no bar

    # history.csv: a row per epoch with what TensorBoard and the log lines hold, and the evaluation's metrics
    rows = read_history(str(tmp_path / "history.csv"))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert [float(row["train_loss"]) for row in rows] == pytest.approx(logged, rel=1e-6)
    assert [float(row["lr"]) for row in rows] == pytest.approx([0.00035 / 2, 0.00035], rel=1e-6)
    assert [float(row["images_per_s"]) for row in rows] == pytest.approx(
        [3 * 24 / float(row["train_seconds"]) for row in rows], rel=1e-5)
    assert all(float(row["train_seconds"]) > 0 and float(row["query_xent"]) > 0 for row in rows)
    final = read_metrics(str(tmp_path))
    for mode, prefix in (("standard", ""), ("centroid", "centroid_")):
        for key, value in final[mode].items():
            assert float(rows[1][prefix + key]) == pytest.approx(value, rel=1e-6), prefix + key


def test_training_on_two_datasets_evaluates_the_test_dataset(synthetic_root, tmp_path, caplog):
    """DATASETS.NAMES market1501,dukemtmcreid trains one classifier over both sets' identities; DATASETS.TEST_NAME
    picks the query/gallery evaluated during training."""
    from datasets.synthetic import generate

    other = tmp_path / "other"
    generate(str(other), train_ids=5, test_ids=6, cameras=2, images_per_camera=2, distractors=2, junk=0, seed=5)
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(os.path.join(synthetic_root, "market1501"), root / "market1501")
    os.symlink(other / "market1501", root / "DukeMTMC-reID")
    out = tmp_path / "out"
    opts = tiny_opts(str(root), str(out), **{"DATASETS.NAMES": "market1501,dukemtmcreid",
                                             "DATASETS.TEST_NAME": "dukemtmcreid", "SOLVER.MAX_EPOCHS": 1,
                                             "SOLVER.MAX_ITERS_PER_EPOCH": 2})
    with caplog.at_level(logging.INFO):
        assert main(CTLModel, ["--config_file=", *opts], "") == 0
    assert "Dataset market1501+dukemtmcreid (test: dukemtmcreid):" in caplog.text
    assert "Evaluation after 1 epoch(s) (dukemtmcreid):" in caplog.text
    saved = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["num_classes"] == 16 + 5  # the synthetic sets' train identities
    assert saved["state_dict"]["model.classifier.weight"].shape[0] == 21
    check_metrics_file(read_metrics(str(out)))


def test_final_epoch_is_checkpointed_and_weighed_for_best(synthetic_root, tmp_path, caplog):
    # Neither period divides MAX_EPOCHS. Lightning's own callbacks would leave last.ckpt at the
    # second of three epochs and, with no evaluation inside fit, write no best.ckpt at all.
    out = str(tmp_path / "run")
    opts = tiny_opts(synthetic_root, out, **{"SOLVER.MAX_EPOCHS": 3, "SOLVER.EVAL_PERIOD": 10,
                                             "SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.MAX_ITERS_PER_EPOCH": 1})
    with caplog.at_level(logging.INFO):
        assert main(CTLModel, ["--config_file=", *opts], "") == 0
    assert "weights_only` was not set" not in caplog.text  # last.ckpt says what it saves: no log line per epoch
    last, best = (torch.load(os.path.join(out, "checkpoints", f"{name}.ckpt"), map_location="cpu",
                             weights_only=True) for name in ("last", "best"))
    assert last["epoch"] == best["epoch"] == 2 and read_metrics(out)["epochs_trained"] == 3
    assert last["state_dict"].keys() == best["state_dict"].keys()
    assert all(torch.equal(last["state_dict"][k], best["state_dict"][k]) for k in last["state_dict"])


EVAL_COLUMNS = {prefix + key for prefix in ("", "centroid_") for key in METRIC_KEYS}


def without_timing(rows: list[dict]) -> list[dict]:
    """history.csv rows without the columns that measure time."""
    return [{k: v for k, v in row.items() if k not in ("train_seconds", "images_per_s")} for row in rows]


class RecordingCTL(CTLModel):
    """Records (epoch, lr, sampler epoch, Adam steps taken) at the start of every epoch."""

    seen: list = []

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        optimizer = self.optimizers()[0].optimizer
        state = next(iter(optimizer.state.values()), {})
        steps = int(state["step"]) if "step" in state else 0
        sampler_epoch = self.trainer.train_dataloader.batch_sampler.epoch
        RecordingCTL.seen.append((self.current_epoch, optimizer.param_groups[0]["lr"], sampler_epoch, steps))


@pytest.mark.parametrize("workers", [0, 1])
def test_resumed_run_ends_with_the_weights_of_the_uninterrupted_run(synthetic_root, tmp_path, workers):
    """REPRODUCIBLE True: 1 epoch + a resume to 2 equals 2 epochs in one go, bit for bit (model, centers,
    both optimizers, metrics). The loader's augmentation used to draw from the process's RNG streams,
    which the resumed process started afresh: 105 of 127 tensors differed."""
    common = {"DATALOADER.NUM_WORKERS": workers, "SOLVER.MAX_ITERS_PER_EPOCH": 1, "SOLVER.EVAL_PERIOD": 10}
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    for out, extra in ((whole, {"SOLVER.MAX_EPOCHS": 2}), (split, {"SOLVER.MAX_EPOCHS": 1}),
                       (split, {"SOLVER.MAX_EPOCHS": 2, "MODEL.RESUME_TRAINING": True})):
        assert main(CTLModel, ["--config_file=", *tiny_opts(synthetic_root, out, **common, **extra)], "") == 0
    a, b = (torch.load(os.path.join(d, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
            for d in (whole, split))
    assert a["epoch"] == b["epoch"] == 1
    differ = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    for state_a, state_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for index, state in state_a["state"].items():
            assert all(torch.equal(v, state_b["state"][index][k]) for k, v in state.items() if torch.is_tensor(v))
    assert read_metrics(whole) == read_metrics(split)
    # history.csv: the same rows, but that the first phase also evaluated epoch 1, its final one
    rows_whole, rows_split = (without_timing(read_history(os.path.join(d, "history.csv"))) for d in (whole, split))
    assert rows_split[1] == rows_whole[1] and len(rows_split) == len(rows_whole) == 2
    assert {k: v for k, v in rows_split[0].items() if k not in EVAL_COLUMNS} == \
        {k: v for k, v in rows_whole[0].items() if k not in EVAL_COLUMNS}
    assert rows_split[0]["mAP"] and not rows_whole[0]["mAP"]
    # The first phase's configuration is kept; the resume's goes beside it.
    assert load_config(os.path.join(split, "config.yaml"), validate=False).SOLVER.MAX_EPOCHS == 1
    assert load_config(os.path.join(split, "config_resume.yaml"), validate=False).SOLVER.MAX_EPOCHS == 2


class FailingEvaluationCTL(CTLModel):
    """Records the epochs it trains and evaluates; the evaluation after each epoch (1-based) in ``fail_after``
    raises once, after the embeddings, where an out-of-memory error in re-ranking would."""

    trained: list = []
    evaluated: list = []
    fail_after: dict = {}

    def training_step(self, batch, batch_idx):
        FailingEvaluationCTL.trained.append(self.current_epoch + 1)
        return super().training_step(batch, batch_idx)

    def evaluate_features(self, features):
        error = FailingEvaluationCTL.fail_after.pop(self.current_epoch + 1, None)
        if error is not None:
            raise error
        return super().evaluate_features(features)

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        FailingEvaluationCTL.evaluated.append(self.last_metrics["epochs_trained"])


def test_a_failed_evaluation_keeps_the_epoch_and_the_resume_repeats_it(synthetic_root, tmp_path, caplog):
    """The evaluation after epoch 2 of 3 fails: last.ckpt, written when that evaluation started, keeps
    epoch 2's training (it used to be written after the evaluation, so the resume trained epoch 2 again
    from epoch 1's checkpoint). The resume repeats that evaluation without training, trains epoch 3,
    whose final evaluation is interrupted (Ctrl-C); a second resume repeats that one (EVAL_PERIOD 2 does
    not divide MAX_EPOCHS 3). Weights, optimisers, best.ckpt and metrics.json end as in one go."""
    common = {"SOLVER.MAX_EPOCHS": 3, "SOLVER.EVAL_PERIOD": 2, "SOLVER.MAX_ITERS_PER_EPOCH": 1,
              # smaller images and batches than tiny_opts': four runs, which take seconds each
              "SOLVER.IMS_PER_BATCH": 3, "DATALOADER.NUM_INSTANCE": 2, "INPUT.SIZE_TRAIN": "[32,16]",
              "INPUT.SIZE_TEST": "[32,16]", "INPUT.PADDING": 2}
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    FailingEvaluationCTL.trained, FailingEvaluationCTL.evaluated, FailingEvaluationCTL.fail_after = [], [], {}
    assert main(FailingEvaluationCTL, ["--config_file=", *tiny_opts(synthetic_root, whole, **common)], "") == 0
    assert (FailingEvaluationCTL.trained, FailingEvaluationCTL.evaluated) == ([1, 2, 3], [2, 3])

    def run(expected_error, **extra):
        FailingEvaluationCTL.trained, FailingEvaluationCTL.evaluated = [], []
        caplog.clear()
        opts = ["--config_file=", *tiny_opts(synthetic_root, split, **common, **extra)]
        sigint = signal.getsignal(signal.SIGINT)
        try:
            with caplog.at_level(logging.INFO):
                if expected_error is None:
                    assert main(FailingEvaluationCTL, opts, "") == 0
                else:
                    with pytest.raises(expected_error):
                        main(FailingEvaluationCTL, opts, "")
        finally:
            signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C once it has caught one
        return FailingEvaluationCTL.trained, FailingEvaluationCTL.evaluated

    last = os.path.join(split, "checkpoints", "last.ckpt")
    FailingEvaluationCTL.fail_after = {2: RuntimeError("CUDA out of memory (simulated)"), 3: KeyboardInterrupt()}
    assert run(RuntimeError) == ([1, 2], [])
    assert ("The evaluation after epoch 2/3 did not finish (RuntimeError: CUDA out of memory (simulated)). "
            f"That epoch's training is saved in {last}: the same command with MODEL.RESUME_TRAINING True "
            'MODEL.PRETRAIN_PATH "" repeats this evaluation and continues with epoch 3.') in caplog.text
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and evaluation_pending(checkpoint)
    assert not os.path.exists(os.path.join(split, "checkpoints", "best.ckpt"))

    # Epoch 2 is not trained again: its evaluation comes first, then epoch 3, whose evaluation is interrupted.
    assert run(SystemExit, **{"MODEL.RESUME_TRAINING": True}) == ([3], [2])
    assert "repeating the evaluation after epoch 2, then continuing with epoch 3 of 3" in caplog.text
    assert "The evaluation after epoch 3/3 did not finish (interrupted)" in caplog.text
    assert "repeats this evaluation and finishes the run." in caplog.text
    assert not os.path.exists(os.path.join(split, "DONE"))
    assert run(None, **{"MODEL.RESUME_TRAINING": True}) == ([], [3])
    assert "repeating the evaluation after epoch 3, the run's last" in caplog.text

    for name in ("last", "best"):
        a, b = (torch.load(os.path.join(d, "checkpoints", f"{name}.ckpt"), map_location="cpu", weights_only=True)
                for d in (whole, split))
        # best.ckpt: epoch 2's or 3's, written in the split run by an evaluation that it repeated
        assert a["epoch"] == b["epoch"] == (2 if name == "last" else b["epoch"]), name
        assert not evaluation_pending(b), name  # nor do its evaluation counts make it look interrupted
        differ = [k for k, v in a["state_dict"].items() if not torch.equal(v, b["state_dict"][k])]
        assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[:3]}"
        for state_a, state_b in zip(a["optimizer_states"], b["optimizer_states"]):
            for index, state in state_a["state"].items():
                assert all(torch.equal(v, state_b["state"][index][k]) for k, v in state.items() if torch.is_tensor(v))
        best_a, best_b = ({k: v for k, v in c["callbacks"].items() if k.startswith("ModelCheckpoint")} for c in (a, b))
        assert [float(s["best_model_score"]) for s in best_a.values()] == \
            [float(s["best_model_score"]) for s in best_b.values()], name
    assert read_metrics(whole) == read_metrics(split) and read_metrics(split)["epochs_trained"] == 3

    # history.csv ends as in one go, but for the training columns of epochs 2 and 3: their losses were lost with
    # the processes whose evaluations failed (a checkpoint holds weights, not logs); the resumes wrote the
    # evaluations.
    rows_whole, rows_split = (without_timing(read_history(os.path.join(d, "history.csv"))) for d in (whole, split))
    assert [row["epoch"] for row in rows_whole] == [row["epoch"] for row in rows_split] == ["1", "2", "3"]
    assert rows_split[0] == rows_whole[0]
    for index in (1, 2):
        assert rows_whole[index]["mAP"] and rows_whole[index]["train_loss"]
        assert {k: v for k, v in rows_split[index].items() if v} == \
            {k: v for k, v in rows_whole[index].items() if k == "epoch" or k in EVAL_COLUMNS}


def test_resume_continues_at_right_epoch_and_lr(synthetic_root, tmp_path):
    out = str(tmp_path / "run")
    opts = tiny_opts(synthetic_root, out, **{"SOLVER.MAX_EPOCHS": 2, "SOLVER.WARMUP_EPOCHS": 4,
                                             "SOLVER.EVAL_PERIOD": 5})
    RecordingCTL.seen = []
    assert main(RecordingCTL, ["--config_file=", *opts], "") == 0
    first = list(RecordingCTL.seen)
    assert [e for e, *_ in first] == [0, 1]
    steps_after_two_epochs = first[-1][3] * 2  # each epoch takes as many steps as the first
    RecordingCTL.seen = []
    resume_opts = tiny_opts(synthetic_root, out, **{"SOLVER.MAX_EPOCHS": 4, "SOLVER.WARMUP_EPOCHS": 4,
                                                    "SOLVER.EVAL_PERIOD": 5, "MODEL.RESUME_TRAINING": True})
    assert main(RecordingCTL, ["--config_file=", *resume_opts], "") == 0
    resumed = RecordingCTL.seen
    cfg = load_config(opts=resume_opts)
    assert [e for e, *_ in resumed] == [2, 3]
    for epoch, lr, sampler_epoch, _ in resumed:
        assert lr == pytest.approx(lr_at_epoch(epoch, cfg.SOLVER)) and sampler_epoch == epoch
    assert resumed[0][3] == steps_after_two_epochs  # Adam state restored, not restarted
    assert read_metrics(out)["epochs_trained"] == 4


def test_baseline_trains_and_num_instance_is_honoured(synthetic_root, tmp_path):
    opts = tiny_opts(synthetic_root, str(tmp_path), **{"SOLVER.MAX_EPOCHS": 1, "DATALOADER.NUM_INSTANCE": 3,
                                                        "DATALOADER.USE_RESAMPLING": True})
    assert main(ModelBase, ["--config_file=", *opts], "") == 0
    check_metrics_file(read_metrics(str(tmp_path)))


def _as_image_folder(market_root, root):
    """The Market-layout folder as image_folder: links in {train,query,gallery}/<pid>/, no cameras."""
    for source, split in (("bounding_box_train", "train"), ("query", "query"), ("bounding_box_test", "gallery")):
        for name in os.listdir(os.path.join(market_root, source)):
            pid = name.split("_")[0]
            os.makedirs(os.path.join(root, split, pid), exist_ok=True)
            os.symlink(os.path.join(market_root, source, name), os.path.join(root, split, pid, name))
    return root


def test_cuhk03p1_short_run_trains_and_evaluates_in_both_layouts(tmp_path):
    """The real crops as reid_folder, and linked into image_folder's layout: file names start with the
    pid, so both list the images in the same order, and query/gallery cameras differ in both; the same
    seed must then give the same metrics."""
    metrics = {}
    for layout in ("reid_folder", "image_folder"):
        root = CUHK03P1 if layout == "reid_folder" else _as_image_folder(CUHK03P1, str(tmp_path / "data"))
        opts = tiny_opts(root, str(tmp_path / layout), **{
            "DATASETS.NAMES": layout, "INPUT.SIZE_TRAIN": "[32,16]", "INPUT.SIZE_TEST": "[32,16]",
            "SOLVER.MAX_EPOCHS": 1, "SOLVER.MAX_ITERS_PER_EPOCH": 3, "DATASETS.VERIFY_IMAGES": False,
            "DATALOADER.USE_RESAMPLING": False})
        assert main(CTLModel, ["--config_file=", *opts], "") == 0
        metrics[layout] = read_metrics(str(tmp_path / layout))
        check_metrics_file(metrics[layout])
    for mode in ("standard", "centroid"):
        assert metrics["image_folder"][mode] == pytest.approx(metrics["reid_folder"][mode], abs=1e-6)


def test_bad_dataset_root_fails_before_training(tmp_path, caplog):
    opts = tiny_opts(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert main(CTLModel, ["--config_file=", *opts], "") == 2
    assert "nowhere" in caplog.text and not os.path.exists(tmp_path / "out" / "checkpoints")


def test_missing_gpu_is_reported_before_the_dataset_is_read(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    opts = tiny_opts(str(tmp_path / "nowhere"), str(tmp_path / "out"), ACCELERATOR="gpu", GPU_IDS="[0]")
    assert main(CTLModel, ["--config_file=", *opts], "") == 2
    assert "no GPU is visible" in caplog.text and "nowhere" not in caplog.text


def test_a_schedule_cut_short_by_max_epochs_is_reported(synthetic_root, tmp_path, caplog):
    from utils.run import warn_about_schedule

    def warnings_for(**overrides):
        caplog.clear()
        warn_about_schedule(load_config(opts=tiny_opts(synthetic_root, str(tmp_path), **overrides)))
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    assert warnings_for(**{"SOLVER.MAX_EPOCHS": 30, "SOLVER.WARMUP_EPOCHS": 10, "SOLVER.LR_STEPS": "[20,29]"}) == []
    late = warnings_for(**{"SOLVER.MAX_EPOCHS": 60, "SOLVER.WARMUP_EPOCHS": 10, "SOLVER.LR_STEPS": "[40,70]"})
    assert len(late) == 1 and "[70]" in late[0] and "never take effect" in late[0]
    short = warnings_for(**{"SOLVER.MAX_EPOCHS": 1, "SOLVER.WARMUP_EPOCHS": 10, "SOLVER.LR_STEPS": "[40,70]"})
    assert len(short) == 2 and "last epoch trains at 3.5e-05" in short[0]  # BASE_LR 3.5e-4 * 1/10
    assert warnings_for(**{"SOLVER.MAX_EPOCHS": 1, "SOLVER.WARMUP_EPOCHS": 10, "SOLVER.LR_STEPS": "[40,70]",
                           "SOLVER.LR_SCHEDULER_NAME": "cosine_annealing"})[0] == short[0]


def test_unwritable_output_dir_found_at_start(synthetic_root, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    opts = tiny_opts(synthetic_root, str(blocker / "sub"))
    assert main(CTLModel, ["--config_file=", *opts], "") == 2
    assert "not writable" in caplog.text


def test_repeated_runs_write_their_folders_and_the_mean(synthetic_root, tmp_path, caplog):
    opts = tiny_opts(synthetic_root, str(tmp_path), **{"SOLVER.MAX_EPOCHS": 1, "REPRODUCIBLE_NUM_RUNS": 2,
                                                        "SOLVER.MAX_ITERS_PER_EPOCH": 2, "DATALOADER.CACHE_IMAGES": "on",
                                                        "DATALOADER.GPU_AUGMENT": "on"})
    with caplog.at_level(logging.INFO):
        assert main(CTLModel, ["--config_file=", *opts], "") == 0
    # the data is read, checked and described once for both runs (each warning once, not per run), and the
    # train images are decoded into the cache once
    assert len(re.findall(r"Dataset \w+:\n  train ", caplog.text)) == 1
    assert len(re.findall(r"Cached \d+ train images", caplog.text)) == 1
    runs = [read_metrics(str(tmp_path / f"run_{i}")) for i in range(2)]
    summary = read_metrics(str(tmp_path))
    assert len(summary["runs"]) == 2
    for mode in ("standard", "centroid"):
        for key in runs[0][mode]:
            assert summary[mode][key] == pytest.approx((runs[0][mode][key] + runs[1][mode][key]) / 2)
            # the sample standard deviation of two values is |a - b| / sqrt(2)
            assert summary[mode + "_std"][key] == pytest.approx(abs(runs[0][mode][key] - runs[1][mode][key]) / 2**0.5)
    # REPRODUCIBLE seeds are REPRODUCIBLE_SEED + run index, recorded per run
    seeds = [json.load(open(tmp_path / f"run_{i}" / "DONE"))["seed"] for i in range(2)]
    assert seeds == [0, 1]

    # Resuming every run of a finished multi-run training re-evaluates none and rewrites nothing.
    def outputs():  # the configs aside: a resume writes config_resume.yaml
        return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith("config")}

    files = outputs()
    with caplog.at_level(logging.INFO):
        assert main(CTLModel, ["--config_file=", *opts, "MODEL.RESUME_TRAINING", "True"], "") == 0
    assert caplog.text.count("finished its 1 epochs already") == 2
    after = outputs()
    assert after.keys() == files.keys() and all(after[p] == files[p] for p in files if p.name != "metrics.json")
    assert read_metrics(str(tmp_path))["runs"] == summary["runs"]


def test_the_mean_of_repeated_runs_keeps_the_re_ranked_row():
    """TEST.RE_RANKING adds a standard_reranked row to each run's metrics: the summary over the runs keeps it
    (it used to average standard and centroid only)."""
    keys = ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20", "rank50")
    runs = [{mode: {k: base + 0.1 * i for k in keys} for mode, base in
             (("standard", 0.2), ("centroid", 0.4), ("standard_reranked", 0.3))} for i in range(2)]
    summary = summarize_runs(runs)
    assert summary["standard_reranked"]["mAP"] == pytest.approx(0.35)
    assert summary["standard_reranked_std"]["rank1"] == pytest.approx(0.1 / 2**0.5)
    assert "standard_reranked" not in summarize_runs([{m: r[m] for m in ("standard", "centroid")} for r in runs])


def test_resuming_every_run_starts_a_run_with_nothing_to_resume_from_the_started_weights(synthetic_root, tmp_path,
                                                                                        caplog):
    """The README's resume of every run sets MODEL.PRETRAIN_PATH "": a run that had not written a
    checkpoint yet used to start from random weights instead of the ImageNet ones the training began with."""
    weights = tmp_path / "imagenet_mobilenet_v2.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), weights)
    out = tmp_path / "runs"
    opts = tiny_opts(synthetic_root, str(out), **{"SOLVER.MAX_EPOCHS": 1, "REPRODUCIBLE_NUM_RUNS": 2,
                                                  "SOLVER.MAX_ITERS_PER_EPOCH": 1, "MODEL.PRETRAINED": True,
                                                  "MODEL.PRETRAIN_PATH": str(weights)})
    assert main(CTLModel, ["--config_file=", *opts], "") == 0
    shutil.rmtree(out / "run_1")  # as if killed before its first checkpoint
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(CTLModel, ["--config_file=", *opts, "MODEL.RESUME_TRAINING", "True", "MODEL.PRETRAIN_PATH", ""],
                    "") == 0
    assert caplog.text.count("finished its 1 epochs already") == 1
    assert f"Loaded backbone weights from {weights}" in caplog.text and "from scratch" not in caplog.text
    assert (out / "run_1" / "DONE").is_file() and (out / "config_resume.yaml").is_file()


class FirstBatchCTL(CTLModel):
    """Records, per epoch, the pids of the first training batch and the sampler's plan for it."""

    seen: dict = {}

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            sampler = self.trainer.train_dataloader.batch_sampler
            planned = [pid for pid, _ in sampler.global_plan()[0][0]]
            got = batch[1].view(-1, self.cfg.DATALOADER.NUM_INSTANCE)[:, 0].tolist()
            FirstBatchCTL.seen[self.current_epoch] = (planned, got)
        return super().training_step(batch, batch_idx)


def test_resumed_epoch_draws_its_own_plan_with_loader_workers(synthetic_root, tmp_path):
    out = str(tmp_path / "run")
    common = {"DATALOADER.NUM_WORKERS": 1, "SOLVER.MAX_ITERS_PER_EPOCH": 2, "SOLVER.EVAL_PERIOD": 5}
    FirstBatchCTL.seen = {}
    assert main(FirstBatchCTL, ["--config_file=", *tiny_opts(synthetic_root, out, **common,
                                                               **{"SOLVER.MAX_EPOCHS": 1})], "") == 0
    assert main(FirstBatchCTL, ["--config_file=", *tiny_opts(synthetic_root, out, **common, **{
        "SOLVER.MAX_EPOCHS": 2, "MODEL.RESUME_TRAINING": True})], "") == 0
    assert sorted(FirstBatchCTL.seen) == [0, 1]
    for planned, got in FirstBatchCTL.seen.values():
        assert planned == got
    assert FirstBatchCTL.seen[0][1] != FirstBatchCTL.seen[1][1]


def test_missing_imagenet_weights_fail_fast_with_a_hint(synthetic_root, tmp_path, caplog):
    opts = tiny_opts(synthetic_root, str(tmp_path), **{"MODEL.PRETRAINED": True,
                                                        "MODEL.PRETRAIN_PATH": str(tmp_path / "resnet18.pth")})
    assert main(CTLModel, ["--config_file=", *opts], "") == 2
    assert "file not found" in caplog.text and "MODEL.PRETRAINED False" in caplog.text
    assert not os.path.exists(tmp_path / "checkpoints")


def test_every_epoch_runs_its_whole_plan(synthetic_root, tmp_path):
    """The PK plan's length varies by epoch; Lightning reads a loader's length once, so without a
    fresh loader per epoch a longer epoch lost its last batches."""
    cfg = load_config(opts=tiny_opts(synthetic_root, str(tmp_path), **{
        "SOLVER.MAX_EPOCHS": 3, "SOLVER.EVAL_PERIOD": 10, "DATALOADER.USE_RESAMPLING": False}))
    lengths = {}
    for seed in range(100):
        sampler = ReIDDataModule(cfg, seed=seed).train_sampler()
        for epoch in range(3):
            sampler.set_epoch(epoch)
            lengths[epoch] = len(sampler)
        if max(lengths[1], lengths[2]) > lengths[0]:
            break
    assert max(lengths[1], lengths[2]) > lengths[0], "no seed gives a later epoch a longer plan"
    ran: dict[int, int] = {}
    loaders = []  # the objects themselves: a freed loader's id could come back

    class CountBatches(CTLModel):
        def on_train_batch_start(self, batch, batch_idx):
            ran[self.current_epoch] = ran.get(self.current_epoch, 0) + 1
            loaders.append(self.trainer.train_dataloader)

    datamodule = ReIDDataModule(cfg, seed=seed)
    model = CountBatches(cfg=cfg_to_dict(cfg), num_classes=datamodule.num_classes, seed=seed)
    build_trainer(cfg, str(tmp_path), max_epochs=3, with_checkpoints=False).fit(model, datamodule=datamodule)
    assert ran == lengths
    assert all(loader is loaders[0] for loader in loaders)  # one loader: its persistent workers live on


def test_checkpoints_are_written_beside_their_path_then_renamed(synthetic_root, tmp_path, monkeypatch):
    """Lightning's own checkpoint IO wrote into $TMPDIR and moved the file into place: a copy, not an
    atomic rename, when $TMPDIR is on another filesystem, so a kill could leave a truncated last.ckpt."""
    from utils.run import AtomicCheckpointIO

    renames, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((str(src), str(dst))), real_replace(src, dst)))
    out = tmp_path / "run"
    opts = tiny_opts(synthetic_root, str(out), **{"SOLVER.MAX_EPOCHS": 1, "SOLVER.MAX_ITERS_PER_EPOCH": 1})
    assert main(CTLModel, ["--config_file=", *opts], "") == 0
    for name in ("best.ckpt", "last.ckpt"):
        target = str(out / "checkpoints" / name)
        assert any(dst == target and os.path.dirname(src) == os.path.dirname(target) for src, dst in renames), name
    assert sorted(os.listdir(out / "checkpoints")) == ["best.ckpt", "last.ckpt"]

    # A save that fails halfway leaves the previous file as it was, and no temporary file.
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.arange(3.0)}, path)

    def failing_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(3)}, path)
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "run"]
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(3.0))
