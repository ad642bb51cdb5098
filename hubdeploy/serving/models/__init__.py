"""Model definitions: one decoder (`causal_lm.CausalLM`) built from shared layers.

`build_model(cfg, dtype, device)` gives a model whose linears are AWQ where the config says
so (AutoAWQ's `modules_to_not_convert` substring rule; the router gate and `lm_head` never
are); `serving.loader.load_model` instead lets the checkpoint's tensors decide per module.
"""
from __future__ import annotations

from typing import Callable

import torch

from hubdeploy.serving.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig
from hubdeploy.serving.models.causal_lm import CausalLM
from hubdeploy.serving.models.layers import Linear, LoRATarget, MoE


def awq_quantized_by_config(cfg: ModelConfig) -> Callable[[str], bool]:
    """Predicate on HF module names: is this linear AWQ-packed according to the config?"""
    q = cfg.quant
    if q is None or not q.is_awq:
        return lambda name: False
    skip = list(q.modules_to_not_convert)

    def quantized(name: str) -> bool:
        if name == "lm_head" or name.endswith(".gate"):
            return False
        return not any(key in name for key in skip)

    return quantized


def check_supported(cfg: ModelConfig) -> None:
    """Raise `ConfigError` for an architecture or layout our decoder cannot run."""
    if not cfg.family:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        extra = " It needs trust_remote_code (auto_map), which we never run." if cfg.trust_remote_code_only else ""
        raise ConfigError(
            f"architecture {cfg.architecture or '(none in config.json)'} is not supported.{extra} "
            f"Supported: {supported}."
        )
    if cfg.shared_expert_intermediate_size:
        raise ConfigError(
            f"{cfg.architecture} with shared experts (shared_expert_intermediate_size="
            f"{cfg.shared_expert_intermediate_size}) is not supported."
        )
    if cfg.is_moe and not cfg.num_experts_per_tok:
        raise ConfigError("config.json declares experts but no num_experts_per_tok")
    if cfg.num_attention_heads % max(cfg.num_key_value_heads, 1):
        raise ConfigError(
            f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {cfg.num_key_value_heads}"
        )


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantized: Callable[[str], bool] | None = None,
    moe_prefix: str | None = None,
) -> CausalLM:
    """Build the decoder for `cfg` with uninitialised weights (the loader fills them).

    `quantized(hf_module_name)` overrides which linears are AWQ; `moe_prefix` picks the
    expert naming (`block_sparse_moe` or `mlp`) that names the LoRA targets.
    """
    check_supported(cfg)
    return CausalLM(cfg, dtype, device, quantized or awq_quantized_by_config(cfg), moe_prefix)


__all__ = ["CausalLM", "Linear", "LoRATarget", "MoE", "awq_quantized_by_config", "build_model", "check_supported"]
