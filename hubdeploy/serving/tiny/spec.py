"""Config and tensor layout of each tiny architecture, with the Hub's real field and key names."""
from __future__ import annotations

from typing import Any

ARCHS = ("mixtral", "qwen3_moe", "llama")
QUANTS = ("awq", "none")

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
LAYERS = 2
INTERMEDIATE = 128  # Mixtral experts and the dense Llama MLP
QWEN_MOE_INTERMEDIATE = 64
GROUP_SIZE = 32  # divides 64 and 128: every quantized in-dimension

BASE_MODEL_IDS = {  # what each tiny model imitates (model card `base_model`)
    "mixtral": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "qwen3_moe": "Qwen/Qwen3-30B-A3B",
    "llama": "meta-llama/Llama-3.1-8B-Instruct",
}


def model_config(arch: str, vocab_size: int, tok_ids: dict[str, Any]) -> dict[str, Any]:
    """`config.json` contents in the field names each family's Hub repos use."""
    common: dict[str, Any] = {
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "max_position_embeddings": 4096,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": vocab_size,
        "bos_token_id": tok_ids["bos"],
        "eos_token_id": tok_ids["eos"],
    }
    if arch == "mixtral":
        return {**common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "intermediate_size": INTERMEDIATE, "num_local_experts": 4, "num_experts_per_tok": 2,
                "output_router_logits": False, "router_aux_loss_coef": 0.02,
                "rope_theta": 1000000.0, "sliding_window": None}
    if arch == "qwen3_moe":
        return {**common, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                "intermediate_size": INTERMEDIATE, "moe_intermediate_size": QWEN_MOE_INTERMEDIATE,
                "num_experts": 8, "num_experts_per_tok": 4, "norm_topk_prob": True,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False,
                "output_router_logits": False, "router_aux_loss_coef": 0.001,
                "rope_theta": 1000000.0, "rope_scaling": None, "use_sliding_window": False,
                "sliding_window": None, "max_window_layers": LAYERS,
                "rms_norm_eps": 1e-6}
    if arch == "llama":
        return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "intermediate_size": INTERMEDIATE, "attention_bias": False, "mlp_bias": False,
                "pretraining_tp": 1, "rope_theta": 500000.0, "rope_scaling": None}
    raise ValueError(f"unknown tiny arch {arch!r}; choose one of {', '.join(ARCHS)}")


def linear_shapes(arch: str) -> list[tuple[str, int, int]]:
    """(module name, out_features, in_features) of every Linear in the decoder layers, in
    checkpoint order; these are the ones AWQ quantizes (the router gate is listed apart)."""
    out: list[tuple[str, int, int]] = []
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.self_attn.q_proj", HEADS * HEAD_DIM, HIDDEN),
            (f"{p}.self_attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
            (f"{p}.self_attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
            (f"{p}.self_attn.o_proj", HIDDEN, HEADS * HEAD_DIM),
        ]
        if arch == "mixtral":
            for e in range(4):
                q = f"{p}.block_sparse_moe.experts.{e}"
                out += [(f"{q}.w1", INTERMEDIATE, HIDDEN), (f"{q}.w2", HIDDEN, INTERMEDIATE),
                        (f"{q}.w3", INTERMEDIATE, HIDDEN)]
        elif arch == "qwen3_moe":
            for e in range(8):
                q = f"{p}.mlp.experts.{e}"
                out += [(f"{q}.gate_proj", QWEN_MOE_INTERMEDIATE, HIDDEN),
                        (f"{q}.up_proj", QWEN_MOE_INTERMEDIATE, HIDDEN),
                        (f"{q}.down_proj", HIDDEN, QWEN_MOE_INTERMEDIATE)]
        else:
            q = f"{p}.mlp"
            out += [(f"{q}.gate_proj", INTERMEDIATE, HIDDEN), (f"{q}.up_proj", INTERMEDIATE, HIDDEN),
                    (f"{q}.down_proj", HIDDEN, INTERMEDIATE)]
    return out


def other_shapes(arch: str, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(tensor name, shape, kind) of the tensors AWQ leaves in fp16: kind 'embed', 'norm', 'router', 'head'."""
    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (vocab, HIDDEN), "embed")]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (HIDDEN,), "norm"),
                (f"{p}.post_attention_layernorm.weight", (HIDDEN,), "norm")]
        if arch == "qwen3_moe":
            out += [(f"{p}.self_attn.q_norm.weight", (HEAD_DIM,), "norm"),
                    (f"{p}.self_attn.k_norm.weight", (HEAD_DIM,), "norm"),
                    (f"{p}.mlp.gate.weight", (8, HIDDEN), "router")]
        elif arch == "mixtral":
            out.append((f"{p}.block_sparse_moe.gate.weight", (4, HIDDEN), "router"))
    out += [("model.norm.weight", (HIDDEN,), "norm"), ("lm_head.weight", (vocab, HIDDEN), "head")]
    return out
