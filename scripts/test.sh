#!/usr/bin/env bash
# The test suite, in the environment `scripts/install.sh --dev` made: lint, types, unit
# tests, then real-VM tests (two VMs at a time at most). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
  venv="${CAPSA_VENV:-/opt/capsa}"
else
  venv="${CAPSA_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/capsa/venv}"
fi
python="$venv/bin/python"
if ! "$python" -c 'import pytest, capsa' 2>/dev/null; then
  echo "test.sh: no capsa test environment at $venv: run \`bash scripts/install.sh --dev\`" >&2
  exit 1
fi
"$python" -m ruff check src tests benchmarks
"$python" -m ruff format --check src tests benchmarks
"$python" -m mypy
"$python" -m pytest -n 2 --dist loadfile -q -p no:cacheprovider "$@"
