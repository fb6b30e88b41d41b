"""Smoke tests of benchmarks/: each script runs end to end at its tiniest scale and writes its JSON report.

Each run is a subprocess (``python benchmarks/bench_x.py`` from the repository root, as documented), so the
scripts' own ``sys.path`` set-up and the ``benchmarks.common`` import are exercised too. Timings are not checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

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
