"""CUDA-graph-safe LoRA decode, proven on the CPU.

On a GPU the runner captures decode steps with adapters once per batch size over static
buffers (`ModelRunner._graph_ctx(b, lora=True)`: a static `LoRABatch` over `g_lora_slots`)
and replays them after `_fill_graph_inputs` wrote the step's tokens and slots in place.
No GPU here, so `GraphEmulation` stands in for capture/replay: it builds each batch size's
context ONCE (as a capture would) and every later step runs the model on those same static
buffers and that same `LoRABatch` object, only their contents changing. Checked:
(i) greedy tokens and log-probs through the static path equal the eager LoRA path (and
transformers with the adapter merged), over steps whose adapter mix and batch size change;
(ii) nothing in the static step waits on the device (`no_host_sync` makes every host sync
raise): the LoRA hooks on the torch path in process, and the whole decode step (base +
LoRA, every kernel on its Triton path, as CUDA runs it) in a Triton-interpreter child.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from hubdeploy.serving import SamplingParams
from hubdeploy.serving.lora.batch import build_lora_batch, static_lora_batch
from hubdeploy.serving.lora.layers import LinearSite, MoESite
from tests.test_lora_engine import GREEDY, PROMPTS, _check, make_llm, reference

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/fixtures/engine.py

LOGPROB_ATOL = 1e-4  # static path pads the batch (GEMMs of another M round differently in the last bits)


# ---------------------------------------------------------------- helpers
class HostSync(RuntimeError):
    pass


def _raise(what: str) -> Any:
    def f(*a: Any, **k: Any) -> Any:
        raise HostSync(f"host sync inside a graph-safe step: {what}")
    return f


def _bool_index(idx: Any) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Make every way torch code waits on the device raise `HostSync`: reading values
    (`item`, `tolist`, `bool()`, `int()`, `float()`, `index()`, `.cpu()`, `.numpy()`) and ops whose
    output shape depends on values (`nonzero`, `unique`, `masked_select`, boolean-mask indexing)."""
    tensor_attrs = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
                    "unique_consecutive", "masked_select", "cpu", "numpy"]
    torch_attrs = ["nonzero", "unique", "unique_consecutive", "masked_select", "argwhere"]
    saved_t = {n: getattr(torch.Tensor, n) for n in tensor_attrs}
    saved_m = {n: getattr(torch, n) for n in torch_attrs}
    get, put = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def getitem(self: torch.Tensor, idx: Any) -> Any:
        if _bool_index(idx):
            raise HostSync("host sync inside a graph-safe step: boolean-mask indexing")
        return get(self, idx)

    def setitem(self: torch.Tensor, idx: Any, value: Any) -> None:
        if _bool_index(idx):
            raise HostSync("host sync inside a graph-safe step: boolean-mask assignment")
        put(self, idx, value)

    try:
        for n in tensor_attrs:
            setattr(torch.Tensor, n, _raise(f"Tensor.{n}"))
        for n in torch_attrs:
            setattr(torch, n, _raise(f"torch.{n}"))
        torch.Tensor.__getitem__, torch.Tensor.__setitem__ = getitem, setitem  # type: ignore[method-assign]
        yield
    finally:
        for n, f in saved_t.items():
            setattr(torch.Tensor, n, f)
        for n, f in saved_m.items():
            setattr(torch, n, f)
        torch.Tensor.__getitem__, torch.Tensor.__setitem__ = get, put  # type: ignore[method-assign]


class GraphEmulation:
    """CPU stand-in for the runner's CUDA graphs: `runner._replay` runs the model on the static
    buffers with the context built once per (batch size, LoRA) — what capture records — so a
    step differs from the last only by what `_fill_graph_inputs` wrote. `whole_step_no_sync`
    runs each replayed forward under `no_host_sync` (the Triton path: what CUDA captures)."""

    def __init__(self, runner: Any, sizes: tuple[int, ...] = (1, 2, 4, 8), whole_step_no_sync: bool = False) -> None:
        self.runner = runner
        runner._alloc_graph_buffers(max(sizes))
        runner.graphs = {b: None for b in sizes}  # what `_graph_batch_size` looks at
        runner._replay = self.replay
        self.ctxs: dict[tuple[int, bool], Any] = {}
        self.whole = whole_step_no_sync
        self.steps: list[tuple[int, int, tuple[int, ...]]] = []  # (rows, padded batch, slot buffer)
        self.in_step = False  # True while a replayed (static) forward runs

    def replay(self, b: int, ids: torch.Tensor, pos: torch.Tensor, ctx: Any) -> torch.Tensor:
        r = self.runner
        key = (b, ctx.lora is not None)
        if key not in self.ctxs:  # "capture"
            self.ctxs[key] = r._graph_ctx(b, lora=key[1])
        gctx = self.ctxs[key]
        n = ids.shape[0]
        r._fill_graph_inputs(n, ids, pos, ctx)
        if gctx.lora is not None:
            assert gctx.lora.static and gctx.lora.token_slots.data_ptr() == r.g_lora_slots.data_ptr()
        self.steps.append((n, b, tuple(r.g_lora_slots[:b].tolist()) if key[1] else ()))
        self.in_step = True
        try:
            with no_host_sync() if self.whole else contextlib.nullcontext():
                out = r.model(r.g_ids[:b], r.g_pos[:b], gctx)
        finally:
            self.in_step = False
        return out[:n]


@contextlib.contextmanager
def lora_hooks_without_host_sync(emu: GraphEmulation) -> Iterator[list[str]]:
    """Run the LoRA hooks' own work in `emu`'s static steps under `no_host_sync` on the torch
    path (eager prefill steps may sync): every `LinearSite` call and the MoE site's LoRA terms
    (its base expert GEMMs group rows on the host, a CPU-only step; the Triton path the GPU
    captures is checked whole in the child process). Yields the names of the hooks that ran."""
    ran: list[str] = []
    orig = {"linear": LinearSite.__call__, "w13": MoESite._add_w13, "w2": MoESite._w2_delta}
    moe_call = MoESite.__call__

    def wrap(name: str, fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            if not emu.in_step:
                return fn(*a, **k)
            ran.append(name)
            with no_host_sync():
                return fn(*a, **k)
        return run

    def moe(*a: Any, **k: Any) -> Any:  # counted: each static MoE call must run both gathered terms
        if emu.in_step:
            ran.append("moe")
        return moe_call(*a, **k)

    patches = {"__call__": (LinearSite, wrap("linear", orig["linear"])),
               "_add_w13": (MoESite, wrap("w13", orig["w13"])), "_w2_delta": (MoESite, wrap("w2", orig["w2"]))}
    patches_moe = {"__call__": (MoESite, moe)}
    todo = [(cls, n, fn) for d in (patches, patches_moe) for n, (cls, fn) in d.items()]
    saved = {(cls, n): getattr(cls, n) for cls, n, _ in todo}
    try:
        for cls, n, fn in todo:
            setattr(cls, n, fn)
        yield ran
    finally:
        for (cls, n), fn in saved.items():
            setattr(cls, n, fn)


def _params(k: int) -> SamplingParams:
    """Different lengths, so requests finish at different steps: the decode batch shrinks and
    its adapter mix changes from step to step."""
    return SamplingParams(max_tokens=2 + 3 * (k % 3), temperature=0.0, ignore_eos=True, logprobs=0)


# ---------------------------------------------------------------- the static batch itself
def test_static_batch_reads_its_buffer_and_caches_nothing() -> None:
    buf = torch.full((4,), -1, dtype=torch.int32)
    lb = static_lora_batch(buf, num_slots=3)
    assert lb.static and lb.active_slots == {0, 1, 2} and lb.segments is None
    buf[:3] = torch.tensor([2, -1, 0], dtype=torch.int32)
    assert lb.slot_of_rows(2).tolist() == [2, 2, -1, -1, 0, 0, -1, -1]
    buf[:3] = torch.tensor([1, 1, -1], dtype=torch.int32)  # next step, same buffer
    assert lb.slot_of_rows(2).tolist() == [1, 1, 1, 1, -1, -1, -1, -1]
    eager = build_lora_batch([(1, 1), (1, 1), (-1, 1)], "cpu")
    assert not eager.static and eager.segments is None and eager.active_slots == {1}
    with pytest.raises(ValueError, match="1-D int32"):
        static_lora_batch(torch.zeros(4, dtype=torch.long), 3)


# ---------------------------------------------------------------- every torch path of a site vs float64 math
def test_linear_site_paths_match_float64_per_row_math(tiny_models) -> None:
    """The fused q|k|v site, adapters touching different parts with different ranks and
    scalings: single-adapter, per-run (prefill), gathered (decode) and static paths each add
    exactly `s·B@A@x` of the row's adapter into each part's columns (and nothing for base rows)."""
    from hubdeploy.serving.lora.adapter import LoRAModuleWeights

    llm = make_llm(tiny_models("llama", "none", adapters=3), max_num_seqs=4)
    ref_site = next(s for s in llm.engine.lora_manager.sites if isinstance(s, LinearSite) and len(s.parts) == 3)
    site = LinearSite(ref_site.module, ref_site.parts, num_slots=4, max_rank=4, dtype=torch.float32,
                      device=torch.device("cpu"))
    n_in = site.module.in_features
    g = torch.Generator().manual_seed(1)
    delta: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
    plan = {0: (2, [0, 2], 0.5), 1: (4, [1], 2.0), 3: (3, [0, 1, 2], 1.5)}  # slot: rank, parts, scaling
    for slot, (r, ps, sc) in plan.items():
        w = {}
        for p in ps:
            name, sl = site.parts[p]
            a, b = torch.randn(r, n_in, generator=g), torch.randn(sl.stop - sl.start, r, generator=g)
            w[name] = LoRAModuleWeights(a, b, sc)
            delta.setdefault(slot, {})[(sl.start, sl.stop)] = sc * b.double() @ a.double()
        site.set_slot(slot, w)

    def run(slots: list[int], q: int, static: bool = False) -> None:
        per_tok = [s for s in slots for _ in range(q)]
        x = torch.randn(len(per_tok), n_in, generator=g)
        base = torch.randn(len(per_tok), site.module.out_features, generator=g)
        lb = static_lora_batch(torch.tensor(per_tok, dtype=torch.int32), site.S) if static else \
            build_lora_batch([(s, q) for s in slots], "cpu")
        y = base.clone()
        site(x, y, lb)
        want = base.double()
        for n, s in enumerate(per_tok):
            for (c0, c1), d in delta.get(s, {}).items():
                want[n, c0:c1] += d @ x[n].double()
        torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"slots {slots} x {q} tokens (static={static}): {m}")
        base_rows = [n for n, s in enumerate(per_tok) if s < 0 or s == 2]
        assert torch.equal(y[base_rows], base[base_rows]), "base rows / empty slot changed"

    run([1, -1, 1], q=1)  # one adapter: plain GEMMs, base rows masked
    run([0, 1, -1, 3, 0], q=1)  # decode of several: gathered BGMV
    run([0, 1, -1, 3, 0, 2], q=8)  # prefill: one GEMM pair per run
    run([0, 1, -1, 3, 2], q=1, static=True)  # static: every part and row; slot 2 holds nothing


# ---------------------------------------------------------------- every torch path of a MoE site vs float64 math
def test_moe_site_paths_match_float64_per_row_math(tiny_models) -> None:
    """One MoE block, three adapters with expert weights (ranks 2/3/4, one touching only some
    experts, each its own scaling): the single-adapter, (expert, slot)-grouped prefill,
    gathered decode and static-batch paths each equal per-row float64 math
    `sum_j w_j · W2'_e(silu(W1'_e x) · W3'_e x)`, W' = W + s·B@A."""
    from hubdeploy.kernels.fused_moe import _dense, topk_route
    from hubdeploy.serving.lora.adapter import LoRAModuleWeights

    llm = make_llm(tiny_models("mixtral", "none", adapters=3), max_num_seqs=4)
    moe = next(s.module for s in llm.engine.lora_manager.sites if isinstance(s, MoESite))
    E, H, I = moe.num_experts, moe.hidden, moe.inter
    site = MoESite(moe, num_slots=4, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    deltas: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    for slot, (r, experts, sc) in {0: (2, range(E), 0.5), 2: (4, [0, 2], 2.0), 3: (3, range(E), 1.0)}.items():
        w = {}
        for e in experts:
            for role, (n_in, n_out) in {"w1": (H, I), "w3": (H, I), "w2": (I, H)}.items():
                a, b = torch.randn(r, n_in, generator=g) * 0.3, torch.randn(n_out, r, generator=g) * 0.3
                w[moe.expert_name(e, role)] = LoRAModuleWeights(a, b, sc)
                deltas.setdefault(slot, {})[(e, role)] = sc * b.double() @ a.double()
        site.set_slot(slot, w)
    w13, w2 = (t.double() for t in _dense(moe.weights, torch.float32))

    def expect(x: torch.Tensor, tw: torch.Tensor, ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
        out = torch.zeros(x.shape[0], H, dtype=torch.float64)
        for n in range(x.shape[0]):
            for j in range(ids.shape[1]):
                e = int(ids[n, j])
                d = deltas.get(slots[n], {})
                z = torch.zeros(I, H, dtype=torch.float64)
                w1 = w13[e, :I] + d.get((e, "w1"), z)
                w3 = w13[e, I:] + d.get((e, "w3"), z)
                w2e = w2[e] + d.get((e, "w2"), z.t())
                xd = x[n].double()
                out[n] += float(tw[n, j]) * (w2e @ (torch.nn.functional.silu(w1 @ xd) * (w3 @ xd)))
        return out

    def run(slots: list[int], q: int, static: bool = False) -> None:
        n_tok = len(slots) * q
        x = torch.randn(n_tok, H, generator=g)
        tw, ids = topk_route(torch.randn(n_tok, E, generator=g), moe.top_k, True)
        per_tok = [s for s in slots for _ in range(q)]
        if static:
            lb = static_lora_batch(torch.tensor(per_tok, dtype=torch.int32), site.S)
        else:
            lb = build_lora_batch([(s, q) for s in slots], "cpu")
        got = site(x, moe.weights, tw, ids, lb)
        torch.testing.assert_close(got.double(), expect(x, tw, ids, per_tok), atol=2e-4, rtol=2e-4,
                                   msg=lambda m: f"slots {slots} x {q} tokens (static={static}): {m}")

    run([2, -1, 2], q=1)  # one adapter beside base rows: per-expert GEMMs, masked
    run([2, -1, 2], q=6)
    run([0, 3, -1, 2, 0], q=1)  # decode of several adapters: gathered BGMV
    run([0, 3, -1, 2, 0, 3], q=8)  # prefill of several: (expert, slot) groups
    run([0, 3, -1, 2, 1], q=1, static=True)  # static: every row gathered; slot 1 is empty (zeros)


# ---------------------------------------------------------------- (i) static == eager (== transformers)
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_static_decode_equals_eager_as_the_mix_changes(arch: str, tiny_models) -> None:
    d = tiny_models(arch, "none", adapters=3)
    llm = make_llm(d, max_num_seqs=8)
    mixes = [[None, "a0", "a2", "a1", "a2", None, "a0"], ["a1", "a1", None, "a2", "a0"], ["a2", "a2", "a2"]]
    runs = [([PROMPTS[k % 3] for k in range(len(m))], [_params(k) for k in range(len(m))], m) for m in mixes]
    want = [llm.generate(p, sp, lora=m) for p, sp, m in runs]  # eager LoRA path (no graphs on the CPU)
    emu = GraphEmulation(llm.engine.runner)
    with lora_hooks_without_host_sync(emu) as ran:
        got = [llm.generate(p, sp, lora=m) for p, sp, m in runs]  # the same static buffers for all
    for (_, _, m), g, w in zip(runs, got, want):
        for k, (a, b) in enumerate(zip(g, w)):
            assert a.token_ids == b.token_ids, \
                f"{arch} request {k} ({m[k]}): static {a.token_ids} != eager {b.token_ids}"
            diff = max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs))
            assert diff <= LOGPROB_ATOL, f"{arch} request {k} ({m[k]}): log-probs differ by {diff:.2e}"
    lora_steps = [s for s in emu.steps if s[2]]
    assert len({s[2] for s in lora_steps}) >= 4, "the adapter mix did not change across static steps"
    assert any(n < b for n, b, _ in lora_steps), "no step was padded"
    assert len({id(c.lora) for c in emu.ctxs.values() if c.lora is not None}) == len(
        {b for b, lo in emu.ctxs if lo}), "one static LoRABatch per batch size"
    assert ran.count("linear") > 0 and ran.count("moe") > 0
    assert ran.count("moe") == ran.count("w13") == ran.count("w2"), "a static MoE step skipped the gathered terms"


def test_static_decode_matches_transformers_with_merged_adapters(tiny_models, tmp_path) -> None:
    """Each prompt with another adapter in one static-path batch (3 rows padded to 4) vs
    transformers on the base with that adapter merged."""
    d = tiny_models("mixtral", "none", adapters=3)
    llm = make_llm(d, max_num_seqs=4)
    GraphEmulation(llm.engine.runner)
    outs = llm.generate(PROMPTS, GREEDY, lora=["a0", "a1", "a2"])
    for i, o in enumerate(outs):
        _check([o], [reference(tiny_models, tmp_path, "mixtral", "none", i)[i]], f"static path, adapter {i}")


def test_adapter_swap_between_static_steps_is_seen(tiny_models) -> None:
    """One device slot: a request for another adapter swaps it in place (`set_slot` copies into
    the same stacks) between static steps; outputs still equal each adapter alone."""
    d = tiny_models("mixtral", "none", adapters=3)
    ref = make_llm(d, max_num_seqs=4)
    loras = ["a2", "a0", "a1", "a2"]
    want = [ref.generate([PROMPTS[k % 3]], GREEDY, lora=lo)[0].token_ids for k, lo in enumerate(loras)]
    del ref
    one = make_llm(d, max_loras=1, max_cpu_loras=1, max_num_seqs=4)
    GraphEmulation(one.engine.runner)
    ptrs = [s.a.data_ptr() if isinstance(s, LinearSite) else s.a13.data_ptr() for s in one.engine.lora_manager.sites
            if s.allocated]
    got = [one.generate([PROMPTS[k % 3]], GREEDY, lora=lo)[0].token_ids for k, lo in enumerate(loras)]
    assert got == want
    assert one.engine.stats().lora_swaps_total >= 4
    assert ptrs == [s.a.data_ptr() if isinstance(s, LinearSite) else s.a13.data_ptr()
                    for s in one.engine.lora_manager.sites if s.allocated], "slot stacks were reallocated"


# ---------------------------------------------------------------- (ii) the whole step, Triton path, no host sync
def test_whole_static_decode_step_has_no_host_sync_on_the_triton_path(tiny_models) -> None:
    """AWQ Mixtral, adapters with expert and attention weights beside a base row, every kernel
    on its Triton path (interpreter child): the whole replayed decode step runs under
    `no_host_sync` (so CUDA can capture it) and gives the eager torch path's greedy tokens."""
    d = tiny_models("mixtral", "awq", adapters=3)
    want = _run_mixed(str(d), emulate=False)
    env = dict(os.environ, TRITON_INTERPRET="1", HUBDEPLOY_FORCE_TRITON="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.test_lora_graph_safe", str(d)],
                          cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    res = json.loads(lines[-1])
    assert res["static_lora_steps"] >= 2, res
    assert res["tokens"] == want


def _run_mixed(model_dir: str, emulate: bool) -> Any:
    llm = make_llm(Path(model_dir), max_model_len=64, kv_cache_tokens=256, max_num_seqs=4)
    emu = GraphEmulation(llm.engine.runner, whole_step_no_sync=True) if emulate else None
    sp = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 2, 3)]
    toks = [o.token_ids for o in llm.generate(PROMPTS[:2] + PROMPTS[:1], sp, lora=["a2", "a0", None])]
    if emu is None:
        return toks
    return {"tokens": toks, "static_lora_steps": sum(1 for s in emu.steps if s[2])}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(_run_mixed(sys.argv[1], emulate=True)))
