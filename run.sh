#!/usr/bin/env bash
# One entry point for a fresh machine with Python >= 3.10 and git:
#   bash run.sh quickstart   set up .venv, train the quickstart model on embedded data, print where the logs are
#   bash run.sh test         set up .venv (with test extras) and run the default test suite
#   bash run.sh setup        only set up
# Extra arguments after the command go to pdelightning / pytest.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "pdelightning needs Python >= 3.10 (found $("$PY" -V))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  # Debian/Ubuntu ship venv separately (python3-venv); fall back to virtualenv from the package index.
  "$PY" -m venv .venv 2>/dev/null || { rm -rf .venv; "$PY" -m pip install --user -q virtualenv && "$PY" -m virtualenv -q .venv; }
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
cmd="${1:-quickstart}"; shift || true
case "$cmd" in
  quickstart) exec .venv/bin/pdelightning fit --config configs/quickstart.yaml "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  setup) echo "ready: .venv/bin/pdelightning --help" ;;
  *) echo "usage: bash run.sh [quickstart|test|setup] [args...]" >&2; exit 2 ;;
esac
