#!/usr/bin/env bash
# Create .venv (if missing) and install ndpsched with the given extras (default: dev).
#   scripts/setup.sh            -> core + test tools
#   scripts/setup.sh rl,dev     -> also gymnasium / stable-baselines3 (CPU torch first)
#   scripts/setup.sh dev,trace  -> also torch (CPU) + transformers for `ndpsched trace record`
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv 2>/dev/null || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [[ ",$extras," == *",rl,"* || ",$extras," == *",trace,"* ]] && ! $py -c "import torch" 2>/dev/null; then
  # stable-baselines3 needs torch; install the small CPU build before anything pulls a CUDA one.
  $py -m pip install -q --retries 0 --timeout 15 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || $py -m pip install -q "torch==2.13.0"
fi
$py -m pip install -q -e ".[${extras}]"
