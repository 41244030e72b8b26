#!/usr/bin/env bash
# Set up and run the test suite (fast tests; `scripts/test.sh -m slow` runs the slow ones).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec .venv/bin/python -m pytest "$@"
