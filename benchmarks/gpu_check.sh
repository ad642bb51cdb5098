#!/usr/bin/env bash
# The GPU check (issue 14): the key numbers first, then the compiled tests, then the kernel tables.
# Installs nothing, needs no server packages (no fastapi/gradio/olah: pytest runs with --noconftest and
# loads only the engine/tiny fixture plugins), runs from the source tree, prints rows as it goes.
#   bash benchmarks/gpu_check.sh            # everything also lands in $OUT (default /tmp/hubdeploy-gpu-check)
#   STEPS="engine tests" bash benchmarks/gpu_check.sh   # a subset, in the order given
# Steps and their time limits (s): engine 70 (CUDA graphs, batch 1/8, TTFT 128: what the product is
# judged on), tests 150 (every -m gpu test, compiled; TESTS=... picks files), tune 140 (the decode kernels'
# launch configs for this GPU: commit the table it writes), kernels 60 (fused MoE / AWQ at Mixtral
# M=1..256), engine_full 120 (graphs vs eager, batch 64, TTFT 1024/4096), lora 70, quantize 150 (our AWQ on
# one full-size Mixtral-8x7B layer, random weights: time per layer and the 32-layer estimate). A step cut short keeps
# its rows; everything is printed as it comes and saved under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET HUBDEPLOY_FORCE_TRITON
PY=${PYTHON:-python3}
OUT="${OUT:-/tmp/hubdeploy-gpu-check}"
mkdir -p "$OUT"
STEPS="${STEPS:-engine tests kernels engine_full lora quantize}"  # + tune: re-tune this GPU (then commit the table)
start=$(date +%s)
status=0
elapsed() { echo $(( $(date +%s) - start )); }

{
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv,noheader 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), torch.version.cuda)"
} | tee "$OUT/env.txt"

step_engine() {  # the key numbers: TPOT batch 1 / 8 with CUDA graphs, TTFT 128, full 32-layer Mixtral-8x7B AWQ
  timeout 70 "$PY" benchmarks/engine_gpu.py --modes graphs --batches 1,8 --prompts 128 --steps 8 \
      --ttft-iters 2 --deadline-s 50 --json "$OUT/engine.json" 2>&1
}

step_tests() {  # every -m gpu test, compiled: kernels vs their torch references, LoRA, CUDA graphs, KV sizing
  timeout "${TESTS_TIMEOUT:-150}" "$PY" -m pytest --noconftest -p tests.fixtures.engine -p tests.fixtures.tiny -p no:cacheprovider \
      -m gpu -q --timeout 100 -rfE \
      ${TESTS:-tests/test_kernels_awq.py tests/test_kernels_moe.py tests/test_kernels_tuned.py \
      tests/test_kernels_attention.py tests/test_kernels_ops.py tests/test_kernels_lora.py tests/test_llm.py \
      tests/test_lora_adapter.py} 2>&1 | tee "$OUT/pytest.txt" | tail -n 60
  return "${PIPESTATUS[0]}"
}

step_tune() {  # sweep the decode kernels' launch configs; writes hubdeploy/kernels/configs/<GPU>.json
  timeout 140 "$PY" benchmarks/tune_kernels.py --deadline-s 100 ${TUNE_ARGS:-} --out "$OUT/tune.json" 2>&1
}

step_kernels() {  # fused W4A16 MoE + AWQ linear at Mixtral shapes, the decode M values first
  timeout 60 "$PY" benchmarks/kernels.py --shapes mixtral --ms 1,16,64,256 --decode-batches 1,8 --no-dense \
      --json "$OUT/kernels.json" 2>&1
}

step_engine_full() {  # eager vs graphs, batch 64, longer prompts
  timeout 120 "$PY" benchmarks/engine_gpu.py --modes graphs,eager --batches 1,8,64 --prompts 1024,4096 --steps 8 \
      --ttft-iters 1 --deadline-s 90 --json "$OUT/engine_full.json" 2>&1
}

step_lora() {  # 16 adapters mixed at batch 16/64 vs the base model, 8 of Mixtral's 32 layers
  timeout 70 "$PY" benchmarks/lora.py --layers 8 --iters 10 --json "$OUT/lora.json" 2>&1
}

step_quantize() {  # issue 19: AWQ + round-to-nearest of one Mixtral-8x7B layer (hidden 4096, ffn 14336, 8 experts)
  timeout 150 "$PY" benchmarks/quantize_layer.py --shape mixtral --layers 1 --rounds 1 --tokens 16384 \
      --json "$OUT/quantize.json" 2>&1
}

main() {
for s in $STEPS; do
  echo "== [$(elapsed)s] step $s =="
  "step_$s"; rc=$?
  echo "== [$(elapsed)s] step $s: rc=$rc =="
  echo "$s rc=$rc at $(elapsed)s" >> "$OUT/env.txt"
  [ "$rc" -eq 0 ] || status=1
done
echo "== done in $(elapsed)s, status $status; files in $OUT =="
return "$status"
}
main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
