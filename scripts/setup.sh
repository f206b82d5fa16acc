#!/usr/bin/env bash
# Set up this checkout: .venv with Python >= 3.12 and megarl installed editable with [dev].
# Idempotent: an existing .venv is reused; pip only installs what is missing.
# More extras with MEGARL_EXTRAS, e.g. MEGARL_EXTRAS=dev,nemo (CI does this to test nemo-run).
# Pick the interpreter with PYTHON=/path/to/python3.12; otherwise python3.12 on PATH, pyenv's
# 3.12, then python3 if it is recent enough.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/find-python.sh
source scripts/find-python.sh

if [ -e .venv ] && ! is_ok .venv/bin/python; then
    echo "setup: .venv exists but has no Python >= 3.12; remove it and run again" >&2
    exit 1
fi
if [ ! -e .venv ]; then
    py="$(find_python)" || {
        echo "setup: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2
        exit 1
    }
    echo "setup: creating .venv with $py ($("$py" --version))"
    "$py" -m venv .venv
fi
extras="${MEGARL_EXTRAS:-dev}"
if [[ ! "$extras" =~ ^[a-z0-9,_-]+$ ]]; then
    echo "setup: MEGARL_EXTRAS='$extras' is not a comma-separated list of extras (e.g. dev,nemo)" >&2
    exit 1
fi
.venv/bin/python -m pip install --quiet -e ".[$extras]"
echo "setup: ready ($(.venv/bin/python --version), megarl $(.venv/bin/python -c 'import megarl; print(megarl.__version__)'))"
