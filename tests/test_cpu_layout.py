"""`serving.cpu_backend.cpu_gemm_layout`: the CPU engine's weight storage for NN GEMMs.

Checked on the real tiny Mixtral loaded by the real loader: values and shapes unchanged,
strides transposed, idempotent, and the model's hidden states equal (to fp32 rounding) to
those of the same model with `[out, in]` weights.
"""
from __future__ import annotations

import torch

from hubdeploy.serving.forward_context import ForwardContext
from hubdeploy.serving.loader import load_model
from hubdeploy.serving.cpu_backend import cpu_gemm_layout
from hubdeploy.serving.models.layers import Linear, MoE
from tests.fixtures.tiny import build_tiny_cached


def _prefill(model: torch.nn.Module, cfg, ids: list[int]) -> torch.Tensor:
    n, bs = len(ids), 16
    nb = -(-n // bs)
    shape = (nb, bs, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
    ctx = ForwardContext(
        is_prefill=True, cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
        context_lens=torch.tensor([n], dtype=torch.int32), block_tables=torch.arange(nb, dtype=torch.int32)[None],
        slot_mapping=torch.arange(n), max_seqlen_q=n, max_context_len=n, kv_caches=caches,
    )
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), ctx))


def test_layout_keeps_values_and_outputs() -> None:
    model_dir = build_tiny_cached("mixtral", "none")
    model, cfg = load_model(model_dir, torch.device("cpu"), torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [3, 17, 42, 99, 5, 8, 61, 23, 11, 7, 2, 90, 33, 34, 35, 36, 37, 38]
    expect = _prefill(model, cfg, ids)

    changed = cpu_gemm_layout(model)
    targets = [m.weight for m in model.modules() if isinstance(m, Linear) and m.weight is not None]
    targets += [w for m in model.modules() if isinstance(m, MoE) for w in (m.w13, m.w2)]
    assert changed == len(targets) > 0
    for w in targets:
        assert not w.is_contiguous() and w.transpose(-1, -2).is_contiguous()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert cpu_gemm_layout(model) == 0  # already done: nothing to change

    got = _prefill(model, cfg, ids)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_packed_copies_are_found_by_their_weight_go_stale_and_leave_with_it() -> None:
    """`remember_packed` / `packed_copy`: a blocked copy is found by the weights it was made from,
    not after their storage changes, and its entry goes when the weight is freed (no model's
    copies outlive it). The payload here is any object: the registry does not look inside."""
    import gc

    from hubdeploy.kernels import cpu_gemm

    w, w2 = torch.randn(8, 4), torch.randn(4, 8)
    payload = object()
    cpu_gemm.remember_packed(payload, w, w2)
    assert cpu_gemm.packed_copy(w, w2) is payload
    assert cpu_gemm.packed_copy(w) is None  # filed for (w, w2): another key
    assert cpu_gemm.packed_copy(torch.randn(8, 4)) is None
    w.data = w.data * 2  # new storage
    assert cpu_gemm.packed_copy(w, w2) is None
    key = id(w)
    assert key in cpu_gemm._PACKED
    del w
    gc.collect()
    assert key not in cpu_gemm._PACKED
