"""Smoke tests of benchmarks/: each script runs end to end at its tiniest scale and writes its JSON report.

Each run is a subprocess (``python benchmarks/bench_x.py`` from the repository root, as documented), so the
scripts' own ``sys.path`` set-up and the ``benchmarks.common`` import are exercised too. Timings are not checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

MACHINE_KEYS = {"cpu_model", "cpu_count", "python", "numpy", "torch", "torch_threads", "gpu", "date", "load_average"}


def run_script(name: str, out: str, *args: str) -> dict:
    command = [sys.executable, os.path.join("benchmarks", name), *args, "--out", out]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert f"wrote {out}" in done.stdout
    assert os.path.isfile(out)
    with open(out) as handle:
        report = json.load(handle)
    machine = report["machine"]
    assert MACHINE_KEYS <= machine.keys()
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1 and machine["cpu_model"]
    return report


def positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert row[key] > 0, (key, row)


def test_bench_eval(tmp_path):
    report = run_script("bench_eval.py", str(tmp_path / "eval.json"), "--scale", "small", "--device", "cpu")
    for mode in ("standard", "centroid"):
        positive(report[mode], "reference_seconds", "evaluate_seconds", "speedup")
        assert 0 < report[mode]["evaluate_metrics"]["mAP"] <= 1
        assert report[mode]["max_abs_diff_mAP_cmc"] < 1e-4
    for mode in ("standard", "centroid"):
        positive(report["fresh_process"][mode], "seconds")


def test_bench_search(tmp_path):
    report = run_script("bench_search.py", str(tmp_path / "search.json"), "--gallery-size", "2000",
                        "--queries", "50", "--dim", "64", "--nprobe", "4", "--ef-search", "32")
    assert {"faiss", "faiss_threads"} <= report["machine"].keys()
    rows = report["results"]
    assert [row["method"] for row in rows] == ["exact", "ivf", "hnsw"]
    for row in rows:
        positive(row, "search_s", "qps", "recall")


def test_bench_embed(tmp_path):
    report = run_script("bench_embed.py", str(tmp_path / "embed.json"), "--images", "8", "--models", "resnet18",
                        "--size", "64", "32", "--batch", "8", "--workers", "0", "--device", "cpu",
                        "--work-dir", str(tmp_path / "work"))
    (row,) = report["results"]
    assert row["model"] == "resnet18" and row["images"] == 8
    positive(row, "end_to_end_s", "end_to_end_ips", "embed_s", "embed_ips")
    assert [lat["batch"] for lat in row["latency"]] == [1, 64]  # the default latency rows
    for lat in row["latency"]:
        positive(lat, "ms_per_batch", "ms_per_image")
        assert lat["calls"] >= 3 and lat["ms_per_image"] == pytest.approx(lat["ms_per_batch"] / lat["batch"])


def test_bench_train(tmp_path):
    # P=2 x K=2 and a single timed step: at P=4 x K=4 a CPU step takes seconds here and the test a minute.
    report = run_script("bench_train.py", str(tmp_path / "train.json"), "--model", "resnet18", "--size", "64", "32",
                        "--synthetic-size", "64", "32", "--p", "2", "--k", "2", "--steps", "1", "--warmup", "1",
                        "--device", "cpu", "--workers", "0", "--compile", "off")
    assert {"platform", "torchvision", "pytorch_lightning"} <= report["machine"].keys()
    rows = report["results"]
    assert [row["config"] for row in rows] == ["plain", "fast"]
    for row in rows:
        positive(row, "pipeline_images_per_s", "step_images_per_s", "end_to_end_images_per_s")
        assert 0.0 <= row["pipeline_batches_with_mocks"] <= 1.0
    assert report["args"]["resampling"] == "off"  # the recipe scripts' setting


def test_recipe_projection_arithmetic():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from recipe_projection import project

    train = {"results": [{"config": "plain", "end_to_end_images_per_s": 1000.0},
                         {"config": "fast", "end_to_end_images_per_s": 3234.0, "pipeline_cache_build_s": 2.0,
                          "pipeline_train_images": 6468}]}
    embed = {"results": [{"end_to_end_ips": 19281.0}, {"end_to_end_ips": 5000.0}]}
    evaluation = {"standard": {"evaluate_seconds": 0.05}, "centroid": {"evaluate_seconds": 0.02}}
    p = project(train, embed, evaluation)
    # 120 epochs x 12936 / 3234 = 480 s, + the cache build scaled to 12936 images (4 s);
    # 3 evaluations x (19281 / 19281 + 0.07) s.
    assert p["training_s"] == 480.0 + 4.0
    assert abs(p["evaluations_s"] - 3 * 1.07) < 1e-9
    assert p["fast_over_plain"] == 3.234 and p["num_evaluations"] == 3


def test_real_data_table_reports_runs_and_calls_only_clear_differences(tmp_path):
    def write(run, standard_map, centroid_map, seconds):
        folder = tmp_path / run
        folder.mkdir()
        metrics = {"epochs_trained": 20,
                   "standard": {"mAP": standard_map, "mINP": 0.1, "rank1": 0.5},
                   "centroid": {"mAP": centroid_map, "mINP": 0.2, "rank1": 0.6}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "wall_seconds.txt").write_text(f"{seconds}\n")

    write("r50_scratch_baseline", 0.300, 0.350, 100)
    write("r50_scratch_ctl", 0.305, 0.330, 110)  # +0.5 points: no call; centroid -2.0: does not hold
    out = tmp_path / "table.md"
    done = subprocess.run([sys.executable, os.path.join("benchmarks", "real_data_table.py"), str(tmp_path),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "| ResNet50, from scratch | CTL | 20 | 30.5 | 10.0 | 50.0 | 33.0 | 20.0 | 60.0 | 110 |" in text
    assert "| MobileNetV2, ImageNet | baseline | not run |" in text
    assert "standard mode: CTL beats the baseline: no clear difference" in text
    assert "centroid mode: CTL beats the baseline: does not hold (mAP -2.0 points" in text
    assert ("ResNet50, from scratch, baseline: centroid beats per-image retrieval: on mAP holds (+5.0 points); "
            "on rank-1 holds (+10.0)") in text


@pytest.mark.parametrize("resampling", ["on", "off"])
def test_check_step_syncs_runs_its_training_window_on_the_cpu(tmp_path, resampling):
    out = tmp_path / "syncs.json"
    done = subprocess.run([sys.executable, os.path.join("benchmarks", "check_step_syncs.py"), "--cpu-plumbing",
                           "--resampling", resampling, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    # No sync mode on the CPU: nothing counted.
    assert report == {"steps": 6, "resampling": resampling, "total": 0, "by_location": {}}
