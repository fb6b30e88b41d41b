#!/usr/bin/env bash
# Quickstart demo: set up .venv, draw a synthetic Market-1501-layout dataset, train the CTL model on
# it for a few epochs on the CPU, evaluate it (standard + centroid) and leave a checkpoint:
#   outputs/demo/metrics.json, outputs/demo/history.csv, outputs/demo/checkpoints/{best,last}.ckpt, outputs/demo/tensorboard/
# Extra KEY VALUE pairs are passed on (e.g. SOLVER.MAX_EPOCHS 4).
set -euo pipefail
cd "$(dirname "$0")/../.."
source train_scripts/setup_env.sh || exit 1
if [ ! -d data/synthetic/market1501 ]; then
    "$PYTHON" -m datasets.synthetic --out data/synthetic
fi
# A training never replaces an earlier one in its OUTPUT_DIR; the demo's own folder is drawn afresh each time.
if [ -d outputs/demo ]; then
    echo "[demo] removing the previous demo run in outputs/demo"
    rm -rf outputs/demo
fi
"$PYTHON" train_ctl_model.py --config_file=configs/demo.yml "$@"
echo "Demo finished: metrics.json and checkpoints/ are in OUTPUT_DIR (outputs/demo unless overridden)"
