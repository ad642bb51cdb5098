"""One decoder for every supported architecture (gpt-fast style: read top to bottom).

Mixtral, Qwen3-MoE, Llama, Mistral, Qwen2 and Qwen3 differ only in flags that
`ModelConfig` carries: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3, Qwen3-MoE), sparse
MoE layers (Mixtral, Qwen3-MoE) and the checkpoint's expert naming. The forward pass is
flat over the step's tokens (`[N]`), paged KV cache per layer in `ctx.kv_caches`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hubdeploy.kernels.cpu_gemm import pack_weight, packed_for, padded_linear, weight_key
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
        direct: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`direct`: call every submodule's `forward` itself — `nn.Module.__call__` has an overhead
        per call, ~10 calls a layer, every step (benchmarks/RESULTS.md, "Engine step (CPU), fixed
        overhead"). Same ops, same results; our modules carry no torch
        hooks (LoRA's `lora_hook` is a plain attribute the forwards call), and `CausalLM.forward`
        asks for it only while none is registered."""
        norm1 = self.input_layernorm.forward if direct else self.input_layernorm
        norm2 = self.post_attention_layernorm.forward if direct else self.post_attention_layernorm
        if residual is None:
            residual = h
            x = norm1(h)
        else:
            x, residual = norm1(h, residual)
        if direct:
            x = self.self_attn.forward(positions, x, ctx, cos_sin, direct=True)
        else:
            x = self.self_attn(positions, x, ctx, cos_sin)
        x, residual = norm2(x, residual)
        return (self.mlp.forward(x, ctx, direct=True) if direct else self.mlp(x, ctx)), residual


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
        ctx.step_cache.clear()  # derived from ctx's tensors, which a reused context may have rewritten
        h = self.embed_tokens(input_ids)
        residual = None
        if _has_torch_hooks(self):
            for layer in self.layers:
                h, residual = layer(positions, h, residual, ctx, self.cos_sin)
            h, _ = self.norm(h, residual)
            return h
        for layer in self._layer_list:
            h, residual = layer.forward(positions, h, residual, ctx, self.cos_sin, direct=True)
        h, _ = self.norm.forward(h, residual)
        return h

    @property
    def _layer_list(self) -> list[DecoderLayer]:
        """The layers as a plain list (iterating an `nn.ModuleList` goes through its iterator each step)."""
        cached = self.__dict__.get("_layers_cache")
        if cached is None or cached[0] is not self.layers or len(cached[1]) != len(self.layers):
            cached = (self.layers, list(self.layers))
            self.__dict__["_layers_cache"] = cached
        return cached[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[B, V]` fp32. On the CPU in bf16 the head runs on a oneDNN-blocked copy of its
        weight (`kernels.cpu_gemm`; faster than `F.linear`, same values here: benchmarks/RESULTS.md,
        "Engine step (CPU), fixed overhead"); fp32, fp16 (no AMX here: blocked was slower at one row) and CUDA take
        `F.linear` as before."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if hidden.dtype != torch.bfloat16 or hidden.device.type != "cpu" or hidden.dim() != 2:
            return F.linear(hidden, weight).float()
        if self.lm_head is not None:
            entry = self.lm_head.cpu_packed  # made by `cpu_gemm_layout` with the other linears
        else:  # tied to the embedding, which `cpu_gemm_layout` leaves alone: blocked here, once
            entry = self.__dict__.get("_tied_head_packed")
            if packed_for(entry, weight) is None:
                entry = (weight_key(weight), pack_weight(weight))
                self.__dict__["_tied_head_packed"] = entry
        return padded_linear(hidden, weight, None, packed_for(entry, weight)).float()

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


def _has_torch_hooks(model: "CausalLM") -> bool:
    """Any torch module hook, global or on one of the model's modules (then every module is
    called through `__call__` so the hooks run). Checked per step: one pass over a module
    list, cheaper than the calls it saves (benchmarks/RESULTS.md, "Engine step (CPU), fixed
    overhead"). The list is taken on first use and
    again when the model's top-level modules or `layers` change; a module swapped in deeper
    than that later is not seen (nothing here does that: LoRA installs `lora_hook` attributes)."""
    from torch.nn.modules import module as _m

    if (_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
            or _m._global_backward_pre_hooks):
        return True
    mods = model.__dict__.get("_all_modules_cache")
    if mods is None or mods[0] != len(model._modules) or mods[1] is not model.layers:
        mods = (len(model._modules), model.layers, list(model.modules()))
        model.__dict__["_all_modules_cache"] = mods
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in mods[2])


def _is_router_or_head(m: Linear) -> bool:
    name = m.hf_parts[0][0]
    return name == "lm_head" or name.endswith(".gate")
