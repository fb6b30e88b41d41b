"""Project the paper's 120-epoch recipe on Market-1501 from measured throughputs.

    python benchmarks/recipe_projection.py --train train.json --embed embed.json --eval eval_market.json

Inputs are the JSON reports of bench_train.py (the "fast" configuration's end-to-end images/s and its
image-cache build), bench_embed.py (test-time embedding images/s, end to end from JPEG files) and
bench_eval.py (evaluate() seconds at Market-1501 scale, standard and centroid mode). The projection:

    training    = EPOCHS x TRAIN_IMAGES / end-to-end images/s   (+ the one-off image cache build,
                  scaled to TRAIN_IMAGES)
    evaluations = (EPOCHS / EVAL_PERIOD) x (TEST_IMAGES / embedding images/s + standard + centroid s)

Market-1501: 12,936 train images, 3,368 query + 15,913 gallery; the S recipe: 120 epochs,
evaluation every 40 (configs/256_resnet50.yml). torch.compile's one-off compilation is not in
bench_train's timed steps. The embedding rate comes from bench_embed (create_embeddings with every
CPU but one decoding, batch 512 in gpu_checks.sh), while evaluation during training embeds through
the validation loader (min(8, CPUs) workers, TEST.IMS_PER_BATCH), so that part is optimistic; at
Market scale it is a few seconds per evaluation either way. Prints a text report.
"""
from __future__ import annotations

import argparse
import json
import sys

TRAIN_IMAGES, TEST_IMAGES = 12_936, 3_368 + 15_913
TARGET_S = 600.0


def project(train: dict, embed: dict, evaluation: dict, epochs: int = 120, eval_period: int = 40) -> dict:
    fast = next(r for r in train["results"] if r["config"] == "fast")
    plain = next((r for r in train["results"] if r["config"] == "plain"), None)
    e2e = fast["end_to_end_images_per_s"]
    cache_s = fast.get("pipeline_cache_build_s", 0.0) * TRAIN_IMAGES / max(fast.get("pipeline_train_images", 1), 1)
    embed_ips = max(r["end_to_end_ips"] for r in embed["results"])
    eval_s = evaluation["standard"]["evaluate_seconds"] + evaluation["centroid"]["evaluate_seconds"]
    num_evals = max(1, epochs // eval_period)
    training = epochs * TRAIN_IMAGES / e2e + cache_s
    evaluations = num_evals * (TEST_IMAGES / embed_ips + eval_s)
    out = {"end_to_end_images_per_s": e2e, "epoch_s": TRAIN_IMAGES / e2e, "cache_build_s": cache_s,
           "embedding_images_per_s": embed_ips, "evaluate_s": eval_s, "num_evaluations": num_evals,
           "training_s": training, "evaluations_s": evaluations, "total_s": training + evaluations,
           "target_s": TARGET_S, "device": train.get("machine", {}).get("gpu")}
    if plain:
        out["plain_end_to_end_images_per_s"] = plain["end_to_end_images_per_s"]
        out["fast_over_plain"] = e2e / plain["end_to_end_images_per_s"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--embed", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--eval-period", type=int, default=40)
    args = parser.parse_args(argv)
    reports = []
    for path in (args.train, args.embed, args.eval):
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as err:
            print(f"cannot project: {path}: {err}", file=sys.stderr)
            return 1
    p = project(*reports, epochs=args.epochs, eval_period=args.eval_period)
    print(f"device: {p['device']}")
    print(f"training: {args.epochs} epochs x {TRAIN_IMAGES} images at {p['end_to_end_images_per_s']:.0f} img/s "
          f"end to end = {p['training_s']:.0f} s ({p['epoch_s']:.2f} s/epoch, cache build {p['cache_build_s']:.1f} s)")
    if "fast_over_plain" in p:
        print(f"fast / plain end to end: {p['fast_over_plain']:.2f}x "
              f"({p['plain_end_to_end_images_per_s']:.0f} img/s plain)")
    print(f"evaluations: {p['num_evaluations']} x ({TEST_IMAGES} images at {p['embedding_images_per_s']:.0f} img/s "
          f"+ evaluate {p['evaluate_s']:.3f} s) = {p['evaluations_s']:.0f} s")
    verdict = "under" if p["total_s"] < TARGET_S else "NOT under"
    print(f"projected recipe: {p['total_s']:.0f} s = {p['total_s'] / 60:.1f} min ({verdict} the "
          f"{TARGET_S / 60:.0f}-minute target; torch.compile's one-off compilation not included)")
    print(json.dumps(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
