#!/usr/bin/env bash
# The test suite: lint, types, unit tests, then real-VM tests (two VMs at a time at most).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check src tests benchmarks
python3 -m ruff format --check src tests benchmarks
python3 -m mypy
python3 -m pytest -n 2 --dist loadfile -q -p no:cacheprovider "$@"
