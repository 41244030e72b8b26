#!/usr/bin/env bash
# Set up and run the main job: `ndpsched simulate` on the embedded defaults
# (Hermes on llama2-70b, one RTX 4090 + 8 NDP-DIMMs, prompt 128, 128 generated tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec .venv/bin/ndpsched simulate "$@"
