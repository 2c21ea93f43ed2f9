#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the default offline experiment: the whole Snakemake DAG of
# config/config.yaml (SmolLM2-135M-Instruct, six synthetic tasks, every composition method) on all
# cores, ending in results/default/report/. Extra arguments go to snakemake (e.g. --cores 8, -n).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
snakemake --profile workflow/profiles/default --cores all "$@"
