#!/usr/bin/env bash
# Set up hubdeploy on a fresh machine: the CPU torch wheel first (an unpinned torch would
# pull a multi-GB CUDA build), then the package. `--test` adds the test extra, Debian's
# chromium for the browser tests, and the separate autoawq and llm-compressor venvs used by
# a few slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

if ! "$PY" -c 'import torch' 2>/dev/null; then
  if [ -n "$(command -v nvidia-smi)" ]; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
if [ "$with_tests" = 1 ]; then
  "$PY" -m pip install -q -e '.[test]'
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    fi
  fi
  if [ -f scripts/setup_autoawq_venv.sh ]; then
    bash scripts/setup_autoawq_venv.sh || echo "note: autoawq venv could not be made; its test will be skipped"
  fi
  if [ -f scripts/setup_llmcompressor_venv.sh ]; then
    bash scripts/setup_llmcompressor_venv.sh || echo "note: llm-compressor venv could not be made; its tests will be skipped"
  fi
else
  "$PY" -m pip install -q -e .
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
# Compile the AVX2 AWQ CPU kernel now (once, cached) rather than on the first AWQ model's load;
# without a C++ compiler it says so and AWQ on the CPU uses torch's int4 kernel instead.
"$PY" -m hubdeploy.kernels.awq_cpu || true
echo "hubdeploy is set up: $(command -v hubdeploy || echo "$PY -m hubdeploy")"
