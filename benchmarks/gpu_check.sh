#!/usr/bin/env bash
# GPU check for the Triton kernels: compiled-kernel tests, then the kernel benchmarks.
# Installs nothing; runs from the source tree; < 8 minutes on one H100 (the steps' timeouts sum to 470 s:
# they were cut by ~0.48 each when the engine step came, so a cut-short step leaves partial numbers).
#   bash benchmarks/gpu_check.sh            # results also land in $OUT (default /tmp/hubdeploy-gpu-check)
# pytest runs with --noconftest so the check works without fastapi/gradio/olah (the shared
# conftest loads Hub fixtures); markers come from pyproject.toml.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET HUBDEPLOY_FORCE_TRITON
OUT="${OUT:-/tmp/hubdeploy-gpu-check}"
mkdir -p "$OUT"
start=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

echo "== pytest -m gpu (kernel tests, compiled) =="
timeout 102 python -m pytest --noconftest -p no:cacheprovider -m gpu -q \
    tests/test_kernels_awq.py tests/test_kernels_moe.py 2>&1 | tee "$OUT/pytest.txt" | tail -n 30
rc_tests=${PIPESTATUS[0]}

echo "== benchmarks/kernels.py =="
timeout 126 python benchmarks/kernels.py --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2> "$OUT/kernels.err"
rc_bench=$?
tail -n 15 "$OUT/kernels.err"

# LoRA bench at 8 of Mixtral's 32 layers to fit the check's time (each layer costs the same; lm_head weighs more);
# decode timed eager and as CUDA graphs (base-only and LoRA graphs, as the engine replays them); 10 rounds each
# to leave time for the two graph captures; rows are printed per phase, so a timeout keeps the decode ones
echo "== LoRA: pytest -m gpu tests/test_lora_adapter.py, then benchmarks/lora.py (Mixtral-8x7B AWQ shapes, rank 16) =="
timeout 58 python -m pytest --noconftest -p no:cacheprovider -m gpu -q tests/test_lora_adapter.py 2>&1 \
    | tee "$OUT/lora_pytest.txt" | tail -n 15
rc_lora_tests=${PIPESTATUS[0]}
timeout 97 python benchmarks/lora.py --layers 8 --iters 10 --json "$OUT/lora.json" > "$OUT/lora.txt" 2> "$OUT/lora.err"
rc_lora_bench=$?
tail -n 5 "$OUT/lora.err"; cat "$OUT/lora.txt"
[ "$rc_lora_tests" -eq 0 ] && [ "$rc_lora_bench" -eq 0 ] || rc_bench=1

# End-to-end engine (issue 4): TTFT 128/1024/4096, TPOT batch 1/8/64, CUDA graphs off/on, full 32-layer
# Mixtral-8x7B-AWQ shapes, random weights (~25 GB), vs the decode roofline. --deadline-s skips what is not
# started in time; on the timeout's SIGTERM it still prints the rows it has.
echo "== benchmarks/engine_gpu.py (LLMEngine, Mixtral-8x7B AWQ shapes, random weights) =="
timeout 87 python benchmarks/engine_gpu.py --ttft-iters 1 --steps 8 --deadline-s 60 --json "$OUT/engine.json" \
    > "$OUT/engine.txt" 2> "$OUT/engine.err"
rc_engine=$?
tail -n 12 "$OUT/engine.err"
[ "$rc_engine" -eq 0 ] || rc_bench=1

echo "== summary: tests rc=$rc_tests, bench rc=$rc_bench, $(( $(date +%s) - start ))s; files in $OUT =="
# the benchmark tables are printed last: the engine's, then the kernels'
sed -n '/^# engine end-to-end/,$p' "$OUT/engine.txt"
sed -n '/^# device/,$p' "$OUT/kernels.txt"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
