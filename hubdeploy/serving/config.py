"""The engine's configuration: its knobs (`EngineArgs`) and the model's (`ModelConfig`).

`ModelConfig` is the engine's single view of an architecture; `hub_integration` reuses it
for its reports so the two never disagree about what a config means. `EngineArgs` declares
every engine knob once; the `serve` flags, the deploy spec's options and the argv the deploy
side renders are generated from its fields. No torch here: the deploy service imports it.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

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
        if method == "compressed_tensors":  # one spelling for the report and the loader
            method = "compressed-tensors"
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


def knob(default: Any, help: str, **meta: Any) -> Any:
    """An `EngineArgs` field with a `serve` flag (`help`, `choices`); `deploy` (pydantic bounds)
    also makes it an option of the deploy spec (`hub_integration.spec.EngineOptions`)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class EngineArgs:
    """Every engine knob, once (nano-vllm's `Config`): `LLM(model, **kw)` takes these fields,
    `serve` has one flag per knob and the deploy side renders argv from them, so none can drift."""

    model: str  # serve: the positional MODEL
    revision: str | None = knob(None, "branch, tag or commit of the Hub repo")
    device: str = knob("auto", "where the engine runs", choices=("auto", "cuda", "cpu"))
    dtype: str = knob("auto", "compute dtype; auto: float32 on the CPU, the checkpoint's on CUDA (float16 for AWQ)",
                      choices=("auto", "float16", "bfloat16", "float32"), deploy={})
    max_model_len: int | None = knob(None, "longest prompt+output in tokens (default: the model's context, at "
                                           "most 4096)", deploy=dict(ge=16, le=1_048_576))
    max_num_seqs: int = knob(64, "sequences decoded at once", deploy=dict(ge=1, le=4096))
    max_num_batched_tokens: int = knob(2048, "tokens one step computes (the prefill chunk budget)",
                                       deploy=dict(ge=16, le=1_048_576))
    block_size: int = knob(16, "tokens per paged KV-cache block")
    kv_cache_tokens: int | None = knob(None, "tokens of paged KV cache (default: on CUDA what "
                                             "gpu_memory_utilization leaves, on the CPU max(4096, 2 x max_model_len))",
                                       deploy=dict(ge=16, le=16_777_216))
    gpu_memory_utilization: float = knob(0.9, "fraction of the GPU's memory for weights, activations and KV cache",
                                         deploy=dict(gt=0, le=1))
    enable_prefix_caching: bool = knob(True, "reuse the KV blocks of shared prompt prefixes")
    enforce_eager: bool = knob(False, "no CUDA graphs")
    cpu_threads: int | None = knob(None, "CPU: threads for prefill-sized steps (default: OMP_NUM_THREADS or all "
                                         "cores); smaller steps use one, leaving the other cores to the HTTP front end")
    cpu_parallel_min_tokens: int | None = knob(None, "CPU: steps of at least this many tokens use cpu_threads "
                                                     "(default: from the model's weights per token)")
    seed: int = knob(0, "torch's global seed, set when the engine starts")
    token: str | None = None  # Hub token for gated/private repos: HF_TOKEN, never argv
    lora_modules: dict[str, str] | None = None  # name -> repo id or local path; serve: --lora NAME=SRC
    max_loras: int = knob(1, "adapters resident on the device at once", deploy=dict(ge=0, le=64))
    max_lora_rank: int = knob(16, "largest LoRA rank accepted", deploy=dict(ge=1, le=512))
    max_cpu_loras: int | None = knob(None, "adapters kept in host memory (default: max(4, max_loras))")

    @classmethod
    def from_flags(cls, ns: argparse.Namespace, **given: Any) -> "EngineArgs":
        """The config `add_engine_flags` parsed into `ns`; `given` sets the rest (and wins)."""
        return cls(**{**{name: getattr(ns, name) for name in knobs()}, **given})


def knobs(kind: str = "help") -> dict[str, tuple[type, Field[Any]]]:
    """The fields whose metadata has `kind` ("help": the serve flags, "deploy": the spec's
    options), each with its type less `None`."""
    hints = get_type_hints(EngineArgs)
    return {f.name: (next(t for t in get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)), f)
            for f in fields(EngineArgs) if kind in f.metadata}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per knob, its type, default, help and choices taken from the field."""
    for name, (kind, f) in knobs().items():
        help_ = f.metadata["help"] + (" (default: %(default)s)" if f.default is not None else "")
        how = dict(action=argparse.BooleanOptionalAction) if kind is bool else \
            dict(type=kind, choices=f.metadata.get("choices"))  # a bool is --x / --no-x
        parser.add_argument("--" + name.replace("_", "-"), default=f.default, help=help_, **how)


def engine_argv(values: Mapping[str, Any]) -> list[str]:
    """`hubdeploy serve` flags for knob values, in their order (None: the engine's default).
    KeyError for a name that is no flag, so the deploy side cannot drift from the engine."""
    flags = knobs()
    argv: list[str] = []
    for name, v in values.items():
        if name not in flags:
            raise KeyError(f"{name!r} is not an engine flag (serving.config.EngineArgs)")
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        elif v is not None:
            argv += [flag, str(v)]
    return argv
