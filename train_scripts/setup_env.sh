#!/usr/bin/env bash
# Source me: creates (once) and activates the project's virtual environment in .venv, installing
# requirements.txt whenever it changes. Needs only Python 3.11 on the machine.
# Sourced: it must not change the caller's shell options, so failures are checked one by one.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_py="${PYTHON_BIN:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$_repo/.venv/bin/python" ]; then
    echo "[setup] creating $_repo/.venv with $_py"
    "$_py" -m venv "$_repo/.venv" || { echo "[setup] could not create .venv with $_py"; return 1; }
fi
_stamp="$_repo/.venv/.requirements.sha256"
_want="$(sha256sum "$_repo/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[setup] installing requirements.txt (first time: a few minutes)"
    "$_repo/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$_repo/requirements.txt" \
        || { echo "[setup] pip install -r requirements.txt failed"; return 1; }
    echo "$_want" > "$_stamp"
fi
export PATH="$_repo/.venv/bin:$PATH"
export PYTHON="$_repo/.venv/bin/python"
