"""The kernel-module convention (kernels/dispatch.py): only `*_triton.py` modules import triton,
and the engine imports and serves on the CPU where triton is absent (macOS)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hubdeploy"


def _imports_triton_at_load(tree: ast.Module) -> bool:
    """A module-level `import triton…` / `from triton… import` (not inside a function)."""
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "triton" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "triton":
            return True
    return False


def test_only_triton_modules_import_triton_at_load() -> None:
    offenders, triton_modules = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        if path.stem.endswith("_triton"):
            triton_modules.append(path.stem)
            assert _imports_triton_at_load(tree), f"{path}: a *_triton module that does not import triton"
        elif _imports_triton_at_load(tree):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"import triton at module level outside *_triton.py: {offenders}"
    assert {"attention_triton", "awq_triton", "fused_moe_triton", "lora_triton", "norm_rope_act_triton"} <= set(
        triton_modules)


_NO_TRITON_CHILD = """
import json, sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as where it is not installed
from hubdeploy import LLM, SamplingParams
from hubdeploy.kernels import attention, awq, fused_moe, lora, norm_rope_act  # every family's dispatcher
from hubdeploy.kernels.dispatch import triton_available
llm = LLM(sys.argv[1], device="cpu", dtype="float32", max_model_len=128, kv_cache_tokens=1024)
out = llm.generate([[1, 5, 9, 20, 31]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
print(json.dumps({"tokens": out[0].token_ids, "triton": triton_available(),
                  "loaded": sorted(m for m in sys.modules if m.endswith("_triton"))}))
"""


def test_engine_serves_on_the_cpu_without_triton(tiny_models) -> None:
    """AWQ Mixtral (fused MoE, AWQ linears, paged attention, norms) with triton unimportable,
    even with HUBDEPLOY_FORCE_TRITON=1: the same greedy tokens as with triton installed."""
    from hubdeploy import LLM, SamplingParams

    d = str(tiny_models("mixtral", "awq"))
    want = LLM(d, device="cpu", dtype="float32", max_model_len=128, kv_cache_tokens=1024).generate(
        [[1, 5, 9, 20, 31]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0].token_ids
    env = dict(os.environ, HUBDEPLOY_FORCE_TRITON="1", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON_CHILD, d], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1])
    assert got["triton"] is False and got["loaded"] == []
    assert got["tokens"] == want and len(want) == 6
