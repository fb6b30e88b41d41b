"""One tiny ResNet18 CTL run trained for six epochs: that it learns, and what TEST.ONLY_TEST, a resume and a second
training do with its checkpoint. A module of its own, so that the run's 260 MB of checkpoints are freed before the
other training tests write theirs (CI's temporary folder may hold less than a gigabyte)."""
import json
import logging
import os
import shutil

import pytest
import torch
import torchvision

from config import cfg_to_dict, load_config
from conftest import check_metrics_file, read_metrics, tiny_opts
from datasets.datamodule import ReIDDataModule
from modelling.bases import ModelBase
from modelling.ctl_model import CTLModel
from utils.run import build_trainer, main


def trained_opts(root: str, out_dir: str, **overrides) -> list[str]:
    """tiny_opts with a ResNet18, the backbone of the trained run: the suite's default MobileNetV2 does not learn
    the synthetic identities in six epochs from scratch."""
    return tiny_opts(root, out_dir, **{"MODEL.NAME": "resnet18", "MODEL.BACKBONE_EMB_SIZE": "512", **overrides})


def copy_run(source: str, target) -> None:
    """A copy of a run folder whose checkpoints are hard links: 260 MB less on disk. The project saves a
    checkpoint by writing a new file and renaming it into place, so a save into the copy leaves the original's
    file as it was."""
    def link_checkpoints(src: str, dst: str) -> None:
        if src.endswith(".ckpt"):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_checkpoints)


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ctl_run"))
    opts = trained_opts(synthetic_root, out, **{"SOLVER.MAX_EPOCHS": 6, "SOLVER.EVAL_PERIOD": 4})
    assert main(CTLModel, ["--config_file=", *opts], "") == 0
    yield out, opts
    shutil.rmtree(out, ignore_errors=True)  # 260 MB of checkpoints: free them for the modules after this one


def test_training_beats_untrained_model(trained_run, synthetic_root, tmp_path):
    out, opts = trained_run
    trained = read_metrics(out)
    check_metrics_file(trained)
    cfg = load_config(opts=trained_opts(synthetic_root, str(tmp_path)))
    from config import cfg_to_dict

    torch.manual_seed(0)
    datamodule = ReIDDataModule(cfg, seed=0)
    untrained = CTLModel(cfg=cfg_to_dict(cfg), num_classes=datamodule.num_classes)
    build_trainer(cfg, str(tmp_path), max_epochs=1, with_checkpoints=False).validate(
        untrained, datamodule=datamodule, verbose=False)
    before = untrained.last_metrics
    assert trained["standard"]["mAP"] > before["standard"]["mAP"] + 0.15
    assert trained["centroid"]["mAP"] > before["centroid"]["mAP"] + 0.15
    assert trained["epochs_trained"] == 6  # the final epoch is evaluated although EVAL_PERIOD=4 does not divide 6


def test_only_test_reproduces_finalread_metrics(trained_run, synthetic_root, tmp_path):
    out, opts = trained_run
    ckpt = os.path.join(out, "checkpoints", "last.ckpt")
    assert os.path.isfile(os.path.join(out, "checkpoints", "best.ckpt"))
    test_opts = trained_opts(synthetic_root, str(tmp_path), **{"TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": ckpt})
    assert main(CTLModel, ["--config_file=", *test_opts], "") == 0
    final, tested = read_metrics(out), read_metrics(str(tmp_path))
    for mode in ("standard", "centroid"):
        for key, value in final[mode].items():
            assert tested[mode][key] == pytest.approx(value, abs=1e-6)


def test_only_test_takes_the_checkpoints_test_settings_unless_given_as_key_value(trained_run, synthetic_root,
                                                                                  tmp_path, caplog):
    """A config file (the recipe) with another test size and normalisation must not change what a checkpoint
    scores: the inference tools take those settings from the checkpoint too. KEY VALUE pairs still win."""
    out, _ = trained_run
    ckpt = os.path.join(out, "checkpoints", "last.ckpt")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("INPUT:\n  SIZE_TEST: [32, 16]\nTEST:\n  FEAT_NORM: False\n")
    opts = trained_opts(synthetic_root, str(tmp_path / "inherit"),
                        **{"TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": ckpt})
    at = opts.index("INPUT.SIZE_TEST")
    opts = opts[:at] + opts[at + 2:]  # the size comes from the config file only
    with caplog.at_level(logging.INFO):
        assert main(CTLModel, [f"--config_file={recipe}", *opts], "") == 0
    assert "INPUT.SIZE_TEST [64, 32] from the checkpoint" in caplog.text
    final, tested = read_metrics(out), read_metrics(str(tmp_path / "inherit"))
    for mode in ("standard", "centroid"):
        for key, value in final[mode].items():
            assert tested[mode][key] == pytest.approx(value, abs=1e-6)
    used = load_config(str(tmp_path / "inherit" / "config_test.yaml"), validate=False)
    assert list(used.INPUT.SIZE_TEST) == [64, 32] and used.TEST.FEAT_NORM is True

    explicit = opts + ["INPUT.SIZE_TEST", "[32,16]"]
    explicit[explicit.index("OUTPUT_DIR") + 1] = str(tmp_path / "explicit")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(CTLModel, [f"--config_file={recipe}", *explicit], "") == 0
    assert "INPUT.SIZE_TEST = [32, 16] differs from the checkpoint's [64, 32]" in caplog.text
    used = load_config(str(tmp_path / "explicit" / "config_test.yaml"), validate=False)
    assert list(used.INPUT.SIZE_TEST) == [32, 16] and used.TEST.FEAT_NORM is True
    assert read_metrics(str(tmp_path / "explicit"))["standard"] != final["standard"]


def test_only_test_needs_no_train_folder(trained_run, synthetic_root, tmp_path):
    """Evaluating a checkpoint on a query/gallery-only set: no bounding_box_train/ needed."""
    root = tmp_path / "data"
    (root / "market1501").mkdir(parents=True)
    for split in ("query", "bounding_box_test"):
        os.symlink(os.path.join(synthetic_root, "market1501", split), root / "market1501" / split)
    out = str(tmp_path / "out")
    test_opts = trained_opts(str(root), out, **{
        "TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": os.path.join(trained_run[0], "checkpoints", "last.ckpt")})
    assert main(CTLModel, ["--config_file=", *test_opts], "") == 0
    final, tested = read_metrics(trained_run[0]), read_metrics(out)
    for mode in ("standard", "centroid"):
        for key, value in final[mode].items():
            assert tested[mode][key] == pytest.approx(value, abs=1e-6)
    training_opts = trained_opts(str(root), str(tmp_path / "train"))
    assert main(CTLModel, ["--config_file=", *training_opts], "") == 2  # training still needs it


def test_only_test_evaluates_on_another_dataset_as_the_embedder_and_evaluate_do(trained_run, tmp_path):
    """Cross-domain testing: a checkpoint trained on one dataset, evaluated on another with a different number of
    train identities (its classifier keeps the checkpoint's classes). The metrics are those of the checkpoint's
    embeddings of the other set, computed here through the inference API and the evaluator."""
    from datasets import build_dataset
    from datasets.synthetic import generate
    from inference.common import Embedder
    from utils.eval_reid import evaluate, query_expansion

    other = tmp_path / "other"
    generate(str(other), train_ids=5, test_ids=7, cameras=2, images_per_camera=2, distractors=3, junk=0, seed=9)
    ckpt = os.path.join(trained_run[0], "checkpoints", "last.ckpt")
    out = str(tmp_path / "out")
    opts = trained_opts(str(other), out, **{"TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": ckpt,
                                            "TEST.QUERY_EXPANSION_K": 3, "TEST.QUERY_EXPANSION_ALPHA": 2.0})
    assert main(CTLModel, ["--config_file=", *opts], "") == 0
    tested = read_metrics(out)

    splits = build_dataset(load_config(opts=opts))
    embedder = Embedder(ckpt, {"GPU_IDS": []}, device="cpu")
    query = embedder.embed([r.path for r in splits.query])
    gallery = embedder.embed([r.path for r in splits.gallery])
    for mode, use_centroids in (("standard", False), ("centroid", True)):
        expected = evaluate(query, gallery, [r.pid for r in splits.query], [r.pid for r in splits.gallery],
                            [r.camid for r in splits.query], [r.camid for r in splits.gallery],
                            use_centroids=use_centroids)
        assert tested[mode]["mAP"] == pytest.approx(expected["mAP"], abs=1e-5)
        assert tested[mode]["rank1"] == pytest.approx(expected["cmc"][0], abs=1e-5)
    # TEST.QUERY_EXPANSION_K adds the standard mode on expanded queries (3 neighbours, weights similarity ** 2)
    expected = evaluate(*query_expansion(query, gallery, 3, 2.0), [r.pid for r in splits.query],
                        [r.pid for r in splits.gallery], [r.camid for r in splits.query],
                        [r.camid for r in splits.gallery])
    assert tested["standard_qe"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-5)
    assert tested["standard_qe"]["mAP"] != pytest.approx(tested["standard"]["mAP"], abs=1e-4)
    assert tested["standard"]["mAP"] != pytest.approx(read_metrics(trained_run[0])["standard"]["mAP"], abs=1e-3)


def test_only_test_in_the_training_folder_keeps_the_training_logs(trained_run, synthetic_root, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run[0], out, ignore=shutil.ignore_patterns("checkpoints"))
    logs_before = {p.name: p.read_bytes() for p in (out / "tensorboard").iterdir()}
    test_opts = trained_opts(synthetic_root, str(out), **{
        "TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": os.path.join(trained_run[0], "checkpoints", "last.ckpt")})
    assert main(CTLModel, ["--config_file=", *test_opts], "") == 0
    assert {p.name: p.read_bytes() for p in (out / "tensorboard").iterdir()} == logs_before
    assert any((out / "tensorboard_test").iterdir())
    assert read_metrics(str(out))["checkpoint"] and (out / "metrics_training.json").is_file()


def test_only_test_moves_an_unreadable_metrics_file_aside(trained_run, synthetic_root, tmp_path):
    """A metrics.json that is not JSON (a run killed while a tool rewrote it by hand) may still be the
    training run's: the evaluation keeps it as metrics_training.json instead of failing or overwriting it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"standard": {"mAP": 0.5')
    test_opts = trained_opts(synthetic_root, str(out), **{
        "TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": os.path.join(trained_run[0], "checkpoints", "last.ckpt")})
    assert main(CTLModel, ["--config_file=", *test_opts], "") == 0
    assert (out / "metrics_training.json").read_text() == '{"standard": {"mAP": 0.5'
    assert read_metrics(str(out))["checkpoint"]


def test_a_new_training_does_not_replace_an_earlier_one(trained_run, synthetic_root, tmp_path, caplog):
    """Training again into a finished run's OUTPUT_DIR used to overwrite its checkpoints and metrics (and,
    stopped half-way, left the old DONE beside new checkpoints); it now stops before writing anything."""
    out = tmp_path / "run"
    copy_run(trained_run[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    opts = trained_opts(synthetic_root, str(out), **{"SOLVER.MAX_EPOCHS": 1})
    assert main(CTLModel, ["--config_file=", *opts], "") == 2
    assert f"OUTPUT_DIR {out} holds an earlier training (checkpoints/" in caplog.text
    assert "MODEL.RESUME_TRAINING True continues it" in caplog.text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a folder handed over as the checkpoint is named as such
    caplog.clear()
    test_opts = trained_opts(synthetic_root, str(tmp_path / "test"), **{
        "TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": str(out / "checkpoints")})
    assert main(CTLModel, ["--config_file=", *test_opts], "") == 2
    assert f"MODEL.PRETRAIN_PATH {out / 'checkpoints'} is a folder" in caplog.text


def test_resume_keeps_a_finished_run_after_only_test_and_refuses_another_model(trained_run, synthetic_root,
                                                                               tmp_path, caplog):
    """After a TEST.ONLY_TEST in the training folder, metrics.json is the test's: a resume of the finished run
    used to re-evaluate and overwrite it. Resuming with the other script used to change the model silently."""
    out = tmp_path / "run"
    copy_run(trained_run[0], out)
    ckpt = str(out / "checkpoints" / "last.ckpt")
    opts = trained_opts(synthetic_root, str(out), **{"SOLVER.MAX_EPOCHS": 6, "SOLVER.EVAL_PERIOD": 4})
    assert main(CTLModel, ["--config_file=", *opts, "TEST.ONLY_TEST", "True", "MODEL.PRETRAIN_PATH", ckpt], "") == 0
    tested = (out / "metrics.json").read_bytes()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(CTLModel, ["--config_file=", *opts, "MODEL.RESUME_TRAINING", "True"], "") == 0
    assert "finished its 6 epochs already" in caplog.text
    assert (out / "metrics.json").read_bytes() == tested

    resume = ["--config_file=", *trained_opts(synthetic_root, str(out), **{"SOLVER.MAX_EPOCHS": 8}),
              "MODEL.RESUME_TRAINING", "True"]
    assert main(ModelBase, resume, "") == 2
    assert "was trained as the ctl model; this script trains the baseline model" in caplog.text
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"] == 5  # untouched


def test_checkpoint_space_check_is_sized_by_the_model_and_skipped_by_only_test(trained_run, synthetic_root,
                                                                              tmp_path, monkeypatch, caplog):
    """The space a training run asks for is what its checkpoints take (not a fixed ResNet50 figure), and
    an evaluation, which writes no checkpoint, runs on a nearly full disk."""
    import shutil as shutil_module

    from utils import run as run_module

    out, opts = trained_run
    cfg = load_config(opts=opts)
    model = CTLModel(cfg=cfg_to_dict(cfg), num_classes=ReIDDataModule(cfg, seed=0).num_classes)
    size = os.path.getsize(os.path.join(out, "checkpoints", "last.ckpt"))
    assert size <= run_module.checkpoint_bytes(model) <= 1.05 * size

    free = 1024
    monkeypatch.setattr(run_module.shutil, "disk_usage", lambda path: shutil_module._ntuple_diskusage(free, 0, free))
    test_opts = trained_opts(synthetic_root, str(tmp_path / "test"), **{
        "TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": os.path.join(out, "checkpoints", "last.ckpt")})
    assert main(CTLModel, ["--config_file=", *test_opts], "") == 0
    free = 2 * size  # best.ckpt + last.ckpt fit, the temporary file of an atomic save does not
    assert main(CTLModel, ["--config_file=", *trained_opts(synthetic_root, str(tmp_path / "train"))], "") == 2
    assert f"need about {3 * run_module.checkpoint_bytes(model) / 2**20:.0f} MiB" in caplog.text
    assert not os.path.exists(tmp_path / "train" / "checkpoints")


def test_only_test_rejects_imagenet_weights_and_other_models(trained_run, synthetic_root, tmp_path, caplog):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    opts = trained_opts(synthetic_root, str(tmp_path), **{"TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": str(path)})
    assert main(CTLModel, ["--config_file=", *opts], "") == 2
    assert "is not a checkpoint of this project" in caplog.text
    ckpt = os.path.join(trained_run[0], "checkpoints", "last.ckpt")
    opts = trained_opts(synthetic_root, str(tmp_path), **{"TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": ckpt,
                                                           "MODEL.NAME": "resnet34"})
    assert main(CTLModel, ["--config_file=", *opts], "") == 2
    assert "MODEL.NAME: checkpoint 'resnet18' vs config 'resnet34'" in caplog.text


def test_only_test_with_reranking_and_visualisation(trained_run, synthetic_root, tmp_path):
    ckpt = os.path.join(trained_run[0], "checkpoints", "last.ckpt")
    opts = trained_opts(synthetic_root, str(tmp_path), **{"TEST.ONLY_TEST": True, "MODEL.PRETRAIN_PATH": ckpt,
                                                           "TEST.RE_RANKING": True, "TEST.VISUALIZE": "yes",
                                                           "TEST.VISUALIZE_TOPK": 5, "TEST.VISUALIZE_MAX_NUMBER": 4,
                                                           "TEST.QUERY_EXPANSION_K": 3})
    assert main(CTLModel, ["--config_file=", *opts], "") == 0
    metrics = read_metrics(str(tmp_path))
    check_metrics_file(metrics)
    assert set(metrics["standard_reranked"]) == set(metrics["standard_qe"]) == set(metrics["standard"])
    for mode in ("standard", "centroid", "standard_reranked", "standard_qe"):
        assert len(list((tmp_path / "visrank" / mode).glob("*.png"))) == 4
        assert len(json.loads((tmp_path / "visrank" / mode / "query_ap.json").read_text())) == 4
    html = (tmp_path / "visrank" / "index.html").read_text()
    assert html.count(".png") == 16 and html.count("<tr><td>") == 4
    assert (tmp_path / "cmc_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
