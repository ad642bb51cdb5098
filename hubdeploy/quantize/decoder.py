"""One decoder layer in plain torch (float32), for calibration: what AWQ's searches run.

The serving decoder works on paged KV caches; calibration needs dense batches of equal-length
blocks, the output of a sub-module (attention, MLP) with trial weights, and the inputs each
linear sees. So this is a small dense forward over a layer's tensor dict (names relative to
the layer, as in the checkpoint), built from the kernels' reference functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hubdeploy.kernels.fused_moe import topk_route
from hubdeploy.kernels.norm_rope_act import apply_rotary_ref, rms_norm_ref
from hubdeploy.quantize.source import MlpNames
from hubdeploy.serving.config import ModelConfig

Weights = dict[str, torch.Tensor]


def linear(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


def attention(h: torch.Tensor, w: Weights, cfg: ModelConfig, cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal self-attention of normed `h [B, L, H]` -> (output `[B, L, H]`, o_proj's input)."""
    b, n, _ = h.shape
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = linear(h, w, "self_attn.q_proj").view(b * n, nh, hd)
    k = linear(h, w, "self_attn.k_proj").view(b * n, nkv, hd)
    v = linear(h, w, "self_attn.v_proj").view(b, n, nkv, hd)
    if cfg.qk_norm:
        q = rms_norm_ref(q, w["self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm_ref(k, w["self_attn.k_norm.weight"], cfg.rms_norm_eps)
    pos = torch.arange(n, device=h.device).repeat(b)
    q, k = apply_rotary_ref(q, k, pos, cos_sin)
    q = q.view(b, n, nh, hd).transpose(1, 2)
    k = k.view(b, n, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    v = v.transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
    o_in = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, nh * hd)
    return linear(o_in, w, "self_attn.o_proj"), o_in


@dataclass
class Routing:
    """Which tokens (rows of the flattened batch) each expert gets, and with what weight."""

    rows: list[torch.Tensor]  # per expert: int64 row indices
    weights: list[torch.Tensor]  # per expert: fp32 routing weights of those rows


def route(h2: torch.Tensor, w: Weights, cfg: ModelConfig, names: MlpNames) -> Routing:
    """The router's top-k choice for normed `h2 [T, H]` (a dense MLP: every row, weight 1)."""
    t = h2.shape[0]
    if names.router is None:
        return Routing([torch.arange(t, device=h2.device)], [torch.ones(t, device=h2.device)])
    logits = linear(h2, w, names.router)
    renorm = cfg.family == "mixtral" or cfg.norm_topk_prob
    topw, ids = topk_route(logits, cfg.num_experts_per_tok, renorm)
    rows, weights = [], []
    for e in range(len(names.experts)):
        r, slot = (ids == e).nonzero(as_tuple=True)
        rows.append(r)
        weights.append(topw[r, slot])
    return Routing(rows, weights)


def expert_act(x: torch.Tensor, w: Weights, gate: str, up: str) -> torch.Tensor:
    """`silu(gate(x)) * up(x)`: the down projection's input."""
    return F.silu(linear(x, w, gate)) * linear(x, w, up)


def mlp(h2: torch.Tensor, w: Weights, names: MlpNames, routing: Routing) -> torch.Tensor:
    """MLP / MoE output for normed rows `h2 [T, H]` under a fixed routing."""
    out = torch.zeros_like(h2)
    for (gate, up, down), rows, rw in zip(names.experts, routing.rows, routing.weights):
        if rows.numel():
            y = linear(expert_act(h2[rows], w, gate, up), w, down)
            out[rows] += y * rw[:, None].to(y.dtype)  # rows are unique within one expert
    return out


@dataclass
class LayerTrace:
    """A layer's forward on the calibration batch: the inputs AWQ's searches need."""

    h: torch.Tensor  # input_layernorm output [B, L, H]: q/k/v input
    o_in: torch.Tensor  # o_proj input [B, L, heads*hd]
    h2: torch.Tensor  # post_attention_layernorm output, flattened [T, H]
    routing: Routing
    out: torch.Tensor  # the layer's output [B, L, H]: the next layer's input
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def layer_forward(x: torch.Tensor, w: Weights, cfg: ModelConfig, names: MlpNames, cos_sin: torch.Tensor) -> LayerTrace:
    """Run decoder layer `w` on `x [B, L, H]` (float32), keeping what calibration needs."""
    eps = cfg.rms_norm_eps
    h = rms_norm_ref(x, w["input_layernorm.weight"], eps)
    attn, o_in = attention(h, w, cfg, cos_sin)
    x = x + attn
    h2 = rms_norm_ref(x, w["post_attention_layernorm.weight"], eps).reshape(-1, x.shape[-1])
    routing = route(h2, w, cfg, names)
    out = x + mlp(h2, w, names, routing).view_as(x)
    return LayerTrace(h, o_in, h2, routing, out)


__all__ = ["LayerTrace", "Routing", "Weights", "attention", "expert_act", "layer_forward", "linear", "mlp", "route"]
