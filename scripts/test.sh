#!/usr/bin/env bash
# Set up (see scripts/setup.sh), check the import layers (pyproject.toml's [tool.importlinter]) and run the whole
# test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
lint-imports --no-logo --no-cache
python -m pytest "$@"
