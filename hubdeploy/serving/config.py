"""Model and quantization configuration, parsed once from a Hub repo's `config.json`.

`ModelConfig` is the engine's single view of an architecture; `hub_integration` reuses it
for its reports so the two never disagree about what a config means.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# architecture name -> family handled by serving.models
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class ConfigError(ValueError):
    """A config the engine cannot serve; the message says what and what to do."""


@dataclass
class QuantConfig:
    """Quantization as declared by the checkpoint (None method: unquantized)."""

    method: str  # "awq", "gptq", "compressed-tensors", "bitsandbytes", "fp8", ...
    bits: int | None = None
    group_size: int | None = None
    zero_point: bool = True
    version: str | None = None  # AWQ: "gemm" / "gemv"; lower-cased
    modules_to_not_convert: list[str] = field(default_factory=list)
    source: str = "config.json"  # or "quant_config.json", "quantize_config.json"
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, q: dict[str, Any], source: str = "config.json") -> "QuantConfig":
        method = str(q.get("quant_method") or q.get("method") or "").lower()
        if not method and ("w_bit" in q or "q_group_size" in q):
            method = "awq"  # AutoAWQ's legacy quant_config.json
        if not method and "bits" in q and "desc_act" in q:
            method = "gptq"
        bits = q.get("bits", q.get("w_bit"))
        group = q.get("group_size", q.get("q_group_size"))
        version = q.get("version") or q.get("format") or q.get("checkpoint_format")
        return cls(
            method=method or "unknown",
            bits=int(bits) if bits is not None else None,
            group_size=int(group) if group is not None else None,
            zero_point=bool(q.get("zero_point", True)),
            version=str(version).lower() if version else None,
            modules_to_not_convert=list(q.get("modules_to_not_convert") or []),
            source=source,
            raw=dict(q),
        )

    @property
    def is_awq(self) -> bool:
        return self.method == "awq"


@dataclass
class ModelConfig:
    """The architecture facts the engine needs, read from `config.json`."""

    architecture: str
    model_type: str
    family: str  # key of SUPPORTED_ARCHITECTURES values; "" when unsupported
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v bias
    qk_norm: bool = False  # Qwen3 / Qwen3-MoE
    sliding_window: int | None = None
    # Mixture of experts (num_experts == 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate_size: int = 0
    torch_dtype: str = "float16"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    quant: QuantConfig | None = None
    trust_remote_code_only: bool = False  # auto_map present and architecture not ours
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        if not self.is_moe or layer_idx in self.mlp_only_layers:
            return False
        return (layer_idx + 1) % max(self.decoder_sparse_step, 1) == 0

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], quant: QuantConfig | None = None) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else ""
        family = SUPPORTED_ARCHITECTURES.get(arch, "")
        heads = int(cfg.get("num_attention_heads", 0) or 0)
        hidden = int(cfg.get("hidden_size", 0) or 0)
        head_dim = cfg.get("head_dim") or (hidden // heads if heads else 0)
        num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        eos = cfg.get("eos_token_id")
        eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if quant is None and cfg.get("quantization_config"):
            quant = QuantConfig.from_dict(cfg["quantization_config"])
        # transformers 5 writes rope settings under `rope_parameters`; older configs at top level.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") not in ("default", None):
            rope_scaling = dict(rope_params)
        moe_inter = int(cfg.get("moe_intermediate_size") or 0)
        if num_experts and not moe_inter:
            moe_inter = int(cfg.get("intermediate_size", 0))  # Mixtral: experts use intermediate_size
        return cls(
            architecture=arch,
            model_type=str(cfg.get("model_type", "")),
            family=family,
            vocab_size=int(cfg.get("vocab_size", 0) or 0),
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size", 0) or 0),
            num_hidden_layers=int(cfg.get("num_hidden_layers", 0) or 0),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim or 0),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048) or 2048),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            num_experts=num_experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0),
            moe_intermediate_size=moe_inter if num_experts else 0,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0) or 0),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos_list,
            quant=quant,
            trust_remote_code_only=bool(cfg.get("auto_map")) and not family,
            raw=dict(cfg),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """Read `config.json` (and a legacy `quant_config.json` if present) from a directory."""
        d = Path(model_dir)
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path} not found: a Hub model repo needs a config.json")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from e
        quant = None
        if not cfg.get("quantization_config"):
            for name in ("quant_config.json", "quantize_config.json"):
                if (d / name).is_file():
                    quant = QuantConfig.from_dict(json.loads((d / name).read_text()), source=name)
                    break
        return cls.from_dict(cfg, quant)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("raw", None)
        if out.get("quant"):
            out["quant"].pop("raw", None)
        return out
