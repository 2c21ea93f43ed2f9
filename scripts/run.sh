#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the main job. Until the Snakemake workflow lands, that is a
# check of the default base model: load SmolLM2-135M-Instruct from its GGUF and answer a chat prompt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
moa model info "$@"
