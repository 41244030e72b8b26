#!/usr/bin/env bash
# Set up and run the main job on the embedded defaults:
#  1. `ndpsched simulate`: Hermes on llama2-70b, one RTX 4090 + 8 NDP-DIMMs, prompt 128,
#     128 generated tokens (tokens/s and the time breakdown);
#  2. `ndpsched sweep`: the embedded design-space sweep (Optuna NSGA-II, trials on local Ray,
#     study in runs/sweeps/.../study.db, SQLite): the Pareto front of tokens/s against hardware
#     cost for llama2-70b. Run the same command again to resume or extend it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev,sweep
.venv/bin/ndpsched simulate
exec .venv/bin/ndpsched sweep "$@"
