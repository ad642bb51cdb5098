"""One decoder for every supported architecture (gpt-fast style: read top to bottom).

Mixtral, Qwen3-MoE, Llama, Mistral, Qwen2 and Qwen3 differ only in flags that
`ModelConfig` carries: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3, Qwen3-MoE), sparse
MoE layers (Mixtral, Qwen3-MoE) and the checkpoint's expert naming. The forward pass is
flat over the step's tokens (`[N]`), paged KV cache per layer in `ctx.kv_caches`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from hubdeploy.kernels.cpu_gemm import linear
from hubdeploy.kernels.norm_rope_act import rotary_cos_sin
from hubdeploy.serving.config import ModelConfig
from hubdeploy.serving.forward_context import ForwardContext
from hubdeploy.serving.models.layers import MLP, Attention, Linear, LoRATarget, MoE, RMSNorm


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        quantized: Callable[[str], bool],
        moe_prefix: str,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, layer_idx, quantized, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        p = f"model.layers.{layer_idx}."
        if cfg.is_moe_layer(layer_idx):
            prefix = p + moe_prefix
            self.mlp: nn.Module = MoE(
                cfg, prefix, quantized(_expert_probe(prefix, moe_prefix)), dtype, device
            )
        else:
            inter = cfg.intermediate_size
            self.mlp = MLP(cfg.hidden_size, inter, p + "mlp.", quantized, dtype, device)

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: ForwardContext,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        x = self.self_attn(positions, x, ctx, cos_sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x, ctx), residual


def _expert_probe(prefix: str, moe_prefix: str) -> str:
    """The HF name used to decide whether a layer's experts are quantized (expert 0's first proj)."""
    return prefix + (".experts.0.w1" if moe_prefix == "block_sparse_moe" else ".experts.0.gate_proj")


class CausalLM(nn.Module):
    """`forward(input_ids [N], positions [N], ctx) -> hidden [N, H]`; `compute_logits(h [B, H]) -> [B, V] fp32`."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quantized: Callable[[str], bool] | None = None,
        moe_prefix: str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        quantized = quantized or (lambda name: False)
        # Mixtral checkpoints mostly use block_sparse_moe.*; Qwen3-MoE (and gptqmodel) use mlp.*
        self.moe_prefix = moe_prefix or ("block_sparse_moe" if cfg.family == "mixtral" else "mlp")
        # _weight: skip the random init (the loader overwrites it; costly for a 150k vocab)
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size,
            _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device), _freeze=True,
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, quantized, self.moe_prefix, dtype, device) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head = None  # logits use embed_tokens.weight
        else:
            self.lm_head = Linear(
                cfg.hidden_size, [("lm_head", cfg.vocab_size)], bias=False, quantized=False, dtype=dtype, device=device
            )
        cos_sin = rotary_cos_sin(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("cos_sin", cos_sin.to(device), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual, ctx, self.cos_sin)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[B, V]` fp32 (a tied head multiplies by the embedding)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight).float()

    def lora_targets(self) -> dict[str, LoRATarget]:
        """HF module name -> where its output lives in our fused modules (the LoRA seam)."""
        out: dict[str, LoRATarget] = {}
        for module in self.modules():
            if isinstance(module, MoE):
                for e in range(module.num_experts):
                    for role, (n_in, n_out) in (
                        ("w1", (module.hidden, module.inter)),
                        ("w3", (module.hidden, module.inter)),
                        ("w2", (module.inter, module.hidden)),
                    ):
                        out[module.expert_name(e, role)] = LoRATarget(
                            module, slice(0, n_out), n_in, n_out, expert=e, proj=role
                        )
            elif isinstance(module, Linear) and not _is_router_or_head(module):
                for name, sl in module.part_slices().items():
                    out[name] = LoRATarget(module, sl, module.in_features, sl.stop - sl.start)
        return out


def _is_router_or_head(m: Linear) -> bool:
    name = m.hf_parts[0][0]
    return name == "lm_head" or name.endswith(".gate")
