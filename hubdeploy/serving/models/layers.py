"""The layers every supported decoder is built from: one linear, one norm, one attention,
one dense MLP and one MoE block.

Each layer calls the `kernels` dispatchers (Triton on CUDA or when forced, the torch
reference otherwise), so the model code has no device-specific branches.

LoRA seam. Every `Linear` that LoRA may target carries `hf_parts` — the Hugging Face
module names fused into it with their output slices (e.g. `qkv_proj` holds `q_proj`,
`k_proj`, `v_proj`) — and a `lora_hook` slot, None by default. When a step's
`ForwardContext.lora` is not None and a hook is installed, the linear calls
`lora_hook(x, y, ctx.lora)` right after its base GEMM; the hook adds `x·A·B·s` into the
right output slices of `y` in place. `MoE` has the same slot, called with the routing as
`lora_hook(x, weights, topk_weights, topk_ids, ctx.lora) -> out | None` in place of
`fused_moe` (expert LoRA acts inside the experts, before the SiLU; None = not touched). The model's
`lora_targets()` maps each HF module name to (module, output slice, expert index) so a LoRA
manager can install hooks without knowing how we fuse. The LoRA math is not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from hubdeploy.kernels.attention import paged_attention, store_kv
from hubdeploy.kernels.awq import AWQPacked, awq_linear, awq_repack
from hubdeploy.kernels.cpu_gemm import linear
from hubdeploy.kernels.fused_moe import AWQMoEWeights, MoEWeights, awq_moe_repack, fused_moe, topk_route
from hubdeploy.kernels.norm_rope_act import apply_rotary, rms_norm, silu_and_mul
from hubdeploy.serving.config import ModelConfig
from hubdeploy.serving.forward_context import ForwardContext

LoRAHook = Callable[..., None]


@dataclass(frozen=True)
class LoRATarget:
    """Where the output of one HF linear lives inside our (possibly fused) module."""

    module: nn.Module  # a `Linear`, or a `MoE` for expert projections
    out_slice: slice  # columns of the module's output (for experts: of that projection)
    in_features: int
    out_features: int
    expert: int | None = None  # expert index for MoE projections
    proj: str | None = None  # MoE: "w1" (gate), "w3" (up), "w2" (down)


class Linear(nn.Module):
    """`y = x Wᵀ + b` with W plain (fp16/bf16/fp32) or AWQ 4-bit (`AWQPacked`).

    `hf_parts` lists the HF linears fused along the output dimension as (name, out_size);
    the loader fills each part, AWQ parts are concatenated and repacked once when complete.
    """

    def __init__(
        self,
        in_features: int,
        hf_parts: list[tuple[str, int]],
        bias: bool,
        quantized: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.hf_parts = list(hf_parts)
        self.out_features = sum(n for _, n in hf_parts)
        self.quantized = quantized
        self.packed: AWQPacked | None = None
        if quantized:
            self.weight = None  # the AWQ tensors arrive from the loader
        else:
            self.weight = nn.Parameter(
                torch.empty(self.out_features, in_features, dtype=dtype, device=device), requires_grad=False
            )
        self.bias = (
            nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.lora_hook: LoRAHook | None = None

    def part_slices(self) -> dict[str, slice]:
        """HF part name -> slice of this module's output columns."""
        out, start = {}, 0
        for name, n in self.hf_parts:
            out[name] = slice(start, start + n)
            start += n
        return out

    def set_awq(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
        """Install AWQ tensors already concatenated over the parts (checkpoint layout)."""
        self.packed = awq_repack(qweight, qzeros, scales, group_size)

    def set_packed(self, packed: AWQPacked) -> None:
        """Install weights already in the kernel layout (other 4-bit formats, repacked by the loader)."""
        if (packed.in_features, packed.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"packed weight is {packed.out_features}x{packed.in_features}, "
                             f"the linear is {self.out_features}x{self.in_features}")
        self.packed = packed

    def forward(self, x: torch.Tensor, lora: Any | None = None) -> torch.Tensor:
        if self.quantized:
            if self.packed is None:
                raise RuntimeError("AWQ linear used before its weights were loaded")
            y = awq_linear(x, self.packed, self.bias)
        else:
            y = linear(x, self.weight, self.bias)
        if lora is not None and self.lora_hook is not None:
            self.lora_hook(x, y, lora)
        return y

    def extra_repr(self) -> str:
        parts = ",".join(n for n, _ in self.hf_parts)
        return f"in={self.in_features}, out={self.out_features}, awq={self.quantized}, parts=[{parts}]"


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add (`rms_norm` kernel)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """Fused qkv projection → optional per-head q/k RMSNorm (Qwen3) → rotary → paged attention."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        quantized: Callable[[str], bool],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        p = f"model.layers.{layer_idx}.self_attn."
        self.qkv_proj = Linear(
            cfg.hidden_size,
            [(p + "q_proj", self.q_size), (p + "k_proj", self.kv_size), (p + "v_proj", self.kv_size)],
            bias=cfg.attention_bias,
            quantized=quantized(p + "q_proj"),
            dtype=dtype,
            device=device,
        )
        self.o_proj = Linear(
            self.q_size, [(p + "o_proj", cfg.hidden_size)], bias=False,
            quantized=quantized(p + "o_proj"), dtype=dtype, device=device,
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext, cos_sin: torch.Tensor,
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x, ctx.lora)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).reshape(n, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).reshape(n, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, positions, cos_sin)  # strided views of qkv are fine
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        o = paged_attention(
            q, k_cache, v_cache,
            cu_seqlens_q=ctx.cu_seqlens_q,
            context_lens=ctx.context_lens,
            block_tables=ctx.block_tables,
            max_seqlen_q=ctx.max_seqlen_q,
            max_context_len=ctx.max_context_len,
            scale=self.scale,
            sliding_window=self.sliding_window,
        )
        return self.o_proj(o.reshape(n, self.q_size), ctx.lora)


class MLP(nn.Module):
    """Dense SwiGLU MLP: fused gate|up → `silu_and_mul` → down."""

    def __init__(
        self,
        hidden: int,
        inter: int,
        prefix: str,
        quantized: Callable[[str], bool],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.gate_up_proj = Linear(
            hidden, [(prefix + "gate_proj", inter), (prefix + "up_proj", inter)], bias=False,
            quantized=quantized(prefix + "gate_proj"), dtype=dtype, device=device,
        )
        self.down_proj = Linear(
            inter, [(prefix + "down_proj", hidden)], bias=False,
            quantized=quantized(prefix + "down_proj"), dtype=dtype, device=device,
        )

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x, ctx.lora)), ctx.lora)


# HF expert projection names per checkpoint naming -> our role
EXPERT_NAMINGS: dict[str, dict[str, str]] = {
    # AutoAWQ / original Mixtral: block_sparse_moe.experts.N.w1|w3|w2, router block_sparse_moe.gate
    "block_sparse_moe": {"w1": "w1", "w3": "w3", "w2": "w2"},
    # Qwen3-MoE and gptqmodel's Mixtral: mlp.experts.N.gate_proj|up_proj|down_proj, router mlp.gate
    "mlp": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
}


class MoE(nn.Module):
    """Sparse MoE: router (never quantized) → `topk_route` → `fused_moe` over stacked experts.

    `hf_prefix` is the checkpoint's block name (`...block_sparse_moe` or `...mlp`); expert
    weights arrive per expert from the loader and are stacked (plain) or repacked (AWQ)
    once all are read.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        hf_prefix: str,
        quantized: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.hf_prefix = hf_prefix
        self.naming = hf_prefix.rsplit(".", 1)[-1]
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.hidden = cfg.hidden_size
        self.inter = cfg.moe_intermediate_size
        # Mixtral always renormalises the top-k weights; Qwen3-MoE follows norm_topk_prob.
        self.renormalize = True if cfg.family == "mixtral" else bool(cfg.norm_topk_prob)
        self.quantized = quantized
        self.gate = Linear(
            cfg.hidden_size, [(hf_prefix + ".gate", cfg.num_experts)], bias=False,
            quantized=False, dtype=dtype, device=device,
        )
        self.weights: MoEWeights | AWQMoEWeights | None = None
        if not quantized:
            e, i, h = self.num_experts, self.inter, self.hidden
            self.w13 = nn.Parameter(torch.empty(e, 2 * i, h, dtype=dtype, device=device), requires_grad=False)
            self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=dtype, device=device), requires_grad=False)
            self.weights = MoEWeights(w13=self.w13, w2=self.w2)
        self.lora_hook: LoRAHook | None = None

    def expert_name(self, e: int, role: str) -> str:
        """HF module name of expert `e`'s projection `role` ("w1", "w3", "w2")."""
        for hf, r in EXPERT_NAMINGS[self.naming].items():
            if r == role:
                return f"{self.hf_prefix}.experts.{e}.{hf}"
        raise KeyError(role)

    def set_awq(self, parts: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], group_size: int) -> None:
        """Stack per-expert AWQ tensors `(e, role) -> (qweight, qzeros, scales)` and repack once."""
        per_role = {r: [parts[(e, r)] for e in range(self.num_experts)] for r in ("w1", "w3", "w2")}
        self.weights = awq_moe_repack(per_role["w1"], per_role["w3"], per_role["w2"], group_size)

    def set_packed(self, weights: AWQMoEWeights) -> None:
        """Install stacked experts already in the kernel layout (other 4-bit formats)."""
        if (weights.num_experts, weights.hidden_size, weights.intermediate_size) != (
                self.num_experts, self.hidden, self.inter):
            raise ValueError("packed experts do not match the MoE block's experts/hidden/intermediate sizes")
        self.weights = weights

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        router_logits = self.gate(x)
        topk_weights, topk_ids = topk_route(router_logits, self.top_k, self.renormalize)
        if ctx.lora is not None and self.lora_hook is not None:
            # LoRA seam (serving.lora.layers.MoESite): expert LoRA changes activations inside
            # each expert, so the hook runs the whole MoE; None = no adapter touches these experts.
            out = self.lora_hook(x, self.weights, topk_weights, topk_ids, ctx.lora)
            if out is not None:
                return out
        return fused_moe(x, self.weights, topk_weights, topk_ids)
