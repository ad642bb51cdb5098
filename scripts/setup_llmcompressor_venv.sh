#!/usr/bin/env bash
# Create .venv-llmcompressor: llm-compressor 0.14.0.1 as the independent writer of
# compressed-tensors W4A16 checkpoints (tests/test_compressed_tensors.py, its slow cases).
# It pins transformers 5.15-5.17 and compressed-tensors 0.19, which must not enter the main
# environment, hence its own venv; it sees the main environment's packages
# (--system-site-packages) so the CPU torch there is reused rather than a CUDA build pulled.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLMCOMPRESSOR_VENV:-$ROOT/.venv-llmcompressor}"
PY="${PYTHON:-python3}"
"$PY" -c 'import torch' 2>/dev/null || "$PY" -m pip install --quiet torch==2.13.0
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet llmcompressor==0.14.0.1 transformers==5.17.0
"$VENV/bin/python" -c "import llmcompressor, compressed_tensors, transformers, torch; print('llmcompressor ok', llmcompressor.__version__, compressed_tensors.__version__, transformers.__version__, torch.__version__)"
