#!/usr/bin/env bash
# The test suite: sets up .venv (and headless Chromium for the HTML report test), then runs pytest.
# pytest's exit code 5 ("no tests collected") counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
source train_scripts/setup_env.sh || exit 1
if ! command -v chromium >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for the HTML report test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || { echo "could not install chromium"; exit 1; }
fi
cd tests
# The training tests write checkpoints, at most about 450 MB at a time: say how much room the temporary folder
# has, and warn when that is less.
scratch="${TMPDIR:-/tmp}"
free_mb=$(df -Pk "$scratch" | awk 'NR==2 {print int($4 / 1024)}')
echo "[setup] free space in $scratch: ${free_mb} MB"
if [ "${free_mb:-0}" -lt 500 ]; then
    echo "[setup] warning: the training tests need about 450 MB in $scratch; set TMPDIR to a folder with more room"
fi
"$PYTHON" -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing the suite"
    exit 1
fi
exit "$status"
