#!/usr/bin/env bash
# Install mitm-sse with its test dependencies into the active Python and run the whole suite.
# Usage: bash scripts/test.sh [pytest args]   (the README's test command)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
python -m ruff check mitm_sse tests bench
python -m pytest -q -p no:cacheprovider "$@"
