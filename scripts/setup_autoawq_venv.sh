#!/usr/bin/env bash
# Create /work/main/.venv-autoawq: AutoAWQ 0.2.9 as the independent reference for our AWQ
# format (tests/test_autoawq_compat.py). AutoAWQ needs transformers 4.51.3 and datasets<4,
# which must not enter the main environment (transformers 5.x), hence its own venv.
# torch is pinned first so pip keeps the CPU build (pip's find-links) instead of pulling another.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AUTOAWQ_VENV:-$ROOT/.venv-autoawq}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet autoawq==0.2.9 transformers==4.51.3 'datasets<4' safetensors
"$VENV/bin/python" -c "import awq, transformers, torch; print('autoawq ok', transformers.__version__, torch.__version__)"
