"""Our decoder vs transformers on the same weights (CPU, float32).

For every architecture, fp16 and AWQ checkpoints: last-position logits of a batch of three
prompts of different lengths (one batched paged prefill) match transformers within
1e-4 max abs (float32 both sides; logits are O(1)), and 32 greedy tokens are identical. AWQ
references are transformers loaded with our *dequantized* weights (its own AWQ loading is
unreliable: transformers 5.24 through gptqmodel leaves the experts randomly initialised).
Checkpoints are built here from transformers configs with random weights (std 0.1, so that
greedy choices are not near-ties).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hubdeploy.serving.loader import load_model
from hubdeploy.serving.models.layers import Linear
from tests.helpers_forward import (
    run_under_triton_interpreter,
    ARCHS,
    awq_quantize_checkpoint,
    dequantized_copy,
    greedy_generate,
    hf_greedy,
    hf_last_logits,
    make_hf_checkpoint,
    prefill_last_logits,
)

transformers = pytest.importorskip("transformers")

LOGIT_ATOL = 1e-4
PROMPTS = [[5, 17, 3, 99, 42, 7, 8, 1, 60, 33, 2], [11, 12], [100, 3, 50, 21, 90, 14]]
GEN_TOKENS = 32

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """Lazily built (arch, quant) -> (our checkpoint dir, transformers reference dir)."""
    root = tmp_path_factory.mktemp("ckpts")
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(arch: str, quant: str) -> tuple[Path, Path]:
        if (arch, quant) not in cache:
            plain = root / f"{arch}-fp16"
            if not plain.exists():
                make_hf_checkpoint(arch, plain)
            if quant == "none":
                cache[(arch, quant)] = (plain, plain)
            else:
                awq = awq_quantize_checkpoint(plain, root / f"{arch}-awq", group_size=32)
                cache[(arch, quant)] = (awq, dequantized_copy(awq, root / f"{arch}-awq-deq"))
        return cache[(arch, quant)]

    return get


@pytest.mark.parametrize("quant", ["none", "awq"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_matches_transformers(arch: str, quant: str, checkpoints) -> None:
    ours_dir, ref_dir = checkpoints(arch, quant)
    model, cfg = load_model(ours_dir)
    assert model.dtype == torch.float32
    if quant == "awq":
        assert cfg.quant is not None and cfg.quant.is_awq
        assert all(m.packed is not None for m in model.modules() if isinstance(m, Linear) and m.quantized)
        assert any(isinstance(m, Linear) and m.quantized for m in model.modules())
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()

    ours = prefill_last_logits(model, PROMPTS)
    ref = hf_last_logits(hf, PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (len(PROMPTS), cfg.vocab_size)
    diff = (ours - ref).abs().max().item()
    print(f"{arch}/{quant}: max abs logit diff {diff:.2e} (logit scale {ref.abs().max().item():.1f})")
    assert diff <= LOGIT_ATOL, f"{arch}/{quant}: max abs logit diff {diff:.2e}"

    assert greedy_generate(model, PROMPTS, GEN_TOKENS) == hf_greedy(hf, PROMPTS, GEN_TOKENS)


@pytest.mark.parametrize("quant", ["awq"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "llama"])
def test_make_tiny_matches_transformers(arch: str, quant: str, tiny_models, tmp_path: Path) -> None:
    """The repo's own tiny AWQ models (`make_tiny`, real Hub layout) against transformers
    (their fp16 twins are the same code path as the fp16 checkpoints above)."""
    src = tiny_models(arch, quant)
    ref_dir = dequantized_copy(src, tmp_path / "deq") if quant == "awq" else src
    model, cfg = load_model(src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    prompts = [[p % cfg.vocab_size for p in prompt] for prompt in PROMPTS]
    diff = (prefill_last_logits(model, prompts) - hf_last_logits(hf, prompts)).abs().max().item()
    assert diff <= LOGIT_ATOL, f"make_tiny {arch}/{quant}: max abs logit diff {diff:.2e}"
    assert greedy_generate(model, prompts, 16) == hf_greedy(hf, prompts, 16)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_triton_path_under_interpreter_matches_reference(arch: str, checkpoints) -> None:
    """A whole AWQ MoE model through every Triton kernel (interpreter, CPU) vs the torch path
    (Qwen3-MoE adds q/k norm, un-renormalised routing and a dense AWQ MLP layer).

    Runs in a subprocess so `TRITON_INTERPRET` / `HUBDEPLOY_FORCE_TRITON` never leak into other
    tests (triton reads the first at import time).
    """
    ckpt, _ = checkpoints(arch, "awq")
    prompts = [p[:5] for p in PROMPTS]
    n_tokens = 3
    got = run_under_triton_interpreter(ckpt, prompts, n_tokens, timeout=240)

    model, _ = load_model(ckpt)
    ref_logits = prefill_last_logits(model, prompts)
    diff = (torch.tensor(got["logits"]) - ref_logits).abs().max().item()
    print(f"triton-interpreter vs torch reference: max abs logit diff {diff:.2e}")
    assert diff <= 2e-2, f"Triton path logits differ from the reference by {diff:.2e}"
    assert got["tokens"] == greedy_generate(model, prompts, n_tokens)


def test_lora_seam_adds_into_the_right_output_slice(checkpoints) -> None:
    """A hook on the fused qkv linear adding x·A·B into k_proj's slice equals changing k_proj's
    weight by (A·B)ᵀ; with `ctx.lora` None the hook is not called (no LoRA work)."""
    ckpt, _ = checkpoints("qwen2", "none")
    model, _ = load_model(ckpt)
    targets = model.lora_targets()
    t = targets["model.layers.1.self_attn.k_proj"]
    assert t.module is model.layers[1].self_attn.qkv_proj and t.out_slice == slice(64, 96)
    assert targets["model.layers.0.mlp.down_proj"].out_slice == slice(0, 64)
    assert "model.layers.0.mlp.gate" not in targets and "lm_head" not in targets
    torch.manual_seed(1)
    a, b = 0.1 * torch.randn(t.in_features, 4), 0.1 * torch.randn(4, t.out_features)
    calls: list[object] = []

    def hook(x: torch.Tensor, y: torch.Tensor, lora: object) -> None:
        calls.append(lora)
        y[:, t.out_slice] += x @ a @ b

    prompts = PROMPTS[:2]
    base = prefill_last_logits(model, prompts)
    t.module.lora_hook = hook
    assert torch.equal(prefill_last_logits(model, prompts), base) and not calls  # ctx.lora None

    from tests.helpers_forward import PagedCache

    cache = PagedCache(model.cfg, len(prompts), max(map(len, prompts)))
    ctx = cache.context([0, 1], [0, 0], [len(p) for p in prompts])
    ctx.lora = "batch-lora-info"
    ids = torch.tensor([x for p in prompts for x in p])
    pos = torch.tensor([i for p in prompts for i in range(len(p))])
    hidden = model(ids, pos, ctx)
    with_lora = model.compute_logits(hidden[ctx.cu_seqlens_q[1:].long() - 1])
    assert calls and calls[0] == "batch-lora-info"

    t.module.lora_hook = None
    with torch.no_grad():
        t.module.weight[t.out_slice] += (a @ b).T
    merged = prefill_last_logits(model, prompts)
    assert (with_lora - merged).abs().max().item() <= LOGIT_ATOL
    assert (with_lora - base).abs().max().item() > 10 * LOGIT_ATOL  # the adapter did change things
