"""The README table of the real-data check (train_scripts/cuhk03p1/real_data_check.sh).

    python benchmarks/real_data_table.py logs/cuhk03p1_check [--out table.md]

Reads <root>/<run>/metrics.json (and wall_seconds.txt) of the four runs, prints standard and
centroid mAP / mINP / rank-1 per run as a Markdown table, and says for each backbone whether the
paper's two claims hold here: CTL beats the baseline, and centroid retrieval beats per-image
retrieval. A claim "holds" when the metric is at least 1 point higher ("does not hold": 1 point
lower; in between no call is made: each run is one seed). CTL vs baseline is called on mAP (rank-1
beside it); centroid vs per-image on mAP and, separately, on rank-1: a centroid query has a single
relevant item, so its mAP is a reciprocal rank and not the same quantity as per-image mAP.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

RUNS = (("r50_scratch", "ResNet50, from scratch"), ("mnv2_imagenet", "MobileNetV2, ImageNet"))
MODELS = (("baseline", "baseline"), ("ctl", "CTL"))
NOISE_POINTS = 1.0  # one seed per run: mAP differences below this many points are not called either way


def _word(delta: float) -> str:
    if delta >= NOISE_POINTS:
        return "holds"
    if delta <= -NOISE_POINTS:
        return "does not hold"
    return f"no clear difference (|Δ| < {NOISE_POINTS:g} point, one seed)"


def load(root: str) -> dict[str, dict]:
    found = {}
    for backbone, _ in RUNS:
        for model, _ in MODELS:
            run = f"{backbone}_{model}"
            path = os.path.join(root, run, "metrics.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                metrics = json.load(f)
            seconds = os.path.join(root, run, "wall_seconds.txt")
            if os.path.exists(seconds):
                with open(seconds) as f:
                    metrics["wall_seconds"] = int(f.read().strip() or 0)
            found[run] = metrics
    return found


def table(found: dict[str, dict]) -> str:
    lines = ["| backbone | model | epochs | standard mAP | standard mINP | standard R1 | centroid mAP "
             "| centroid mINP | centroid R1 | wall (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backbone, backbone_name in RUNS:
        for model, model_name in MODELS:
            m = found.get(f"{backbone}_{model}")
            if m is None:
                lines.append(f"| {backbone_name} | {model_name} | not run | | | | | | | |")
                continue
            s, c = m["standard"], m["centroid"]
            lines.append(f"| {backbone_name} | {model_name} | {m.get('epochs_trained', '?')} "
                         f"| {100 * s['mAP']:.1f} | {100 * s['mINP']:.1f} | {100 * s['rank1']:.1f} "
                         f"| {100 * c['mAP']:.1f} | {100 * c['mINP']:.1f} | {100 * c['rank1']:.1f} "
                         f"| {m.get('wall_seconds', '?')} |")
    return "\n".join(lines)


def verdicts(found: dict[str, dict]) -> list[str]:
    out = []
    for backbone, backbone_name in RUNS:
        base, ctl = found.get(f"{backbone}_baseline"), found.get(f"{backbone}_ctl")
        if base and ctl:
            for mode in ("standard", "centroid"):
                delta = 100 * (ctl[mode]["mAP"] - base[mode]["mAP"])
                word = _word(delta)
                out.append(f"- {backbone_name}, {mode} mode: CTL beats the baseline: {word} "
                           f"(mAP {delta:+.1f} points, rank-1 "
                           f"{100 * (ctl[mode]['rank1'] - base[mode]['rank1']):+.1f})")
        for model, model_name in MODELS:
            m = found.get(f"{backbone}_{model}")
            if m:
                # Centroid mAP has one relevant item per query (it equals centroid mINP), so rank-1,
                # which asks the same question in both modes, gets its own verdict.
                delta = 100 * (m["centroid"]["mAP"] - m["standard"]["mAP"])
                delta_r1 = 100 * (m["centroid"]["rank1"] - m["standard"]["rank1"])
                out.append(f"- {backbone_name}, {model_name}: centroid beats per-image retrieval: on mAP "
                           f"{_word(delta)} ({delta:+.1f} points); on rank-1 {_word(delta_r1)} ({delta_r1:+.1f})")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="OUTPUT_ROOT of real_data_check.sh")
    parser.add_argument("--out", help="also write the table and verdicts (Markdown) here")
    args = parser.parse_args(argv)
    found = load(args.root)
    if not found:
        print(f"no <run>/metrics.json under {args.root}", file=sys.stderr)
        return 1
    text = table(found) + "\n\n" + "\n".join(verdicts(found)) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
