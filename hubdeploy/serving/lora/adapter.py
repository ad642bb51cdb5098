"""Reading and validating a PEFT LoRA adapter (a local directory or a Hub repo).

An adapter is `adapter_config.json` + `adapter_model.safetensors` as PEFT saves them:
keys `base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]).
We follow PEFT's own rules for which modules an adapter touches (`target_modules` as names
or a regex, `exclude_modules`, `layers_to_transform`/`layers_pattern`) and for each module's
rank and scaling (`rank_pattern`/`alpha_pattern`; alpha/r, or alpha/sqrt(r) with
`use_rslora`), and refuse clearly, with a `LoRAError` naming the problem, what we cannot
serve exactly: DoRA, `modules_to_save`, embedding/`lm_head` LoRA, LoRA biases, a base model
whose shapes do not fit, a rank above `max_lora_rank`, and missing or corrupt files. Pickled
`adapter_model.bin` files are never unpickled.

Fused MoE experts (`target_parameters`). transformers 5 stores Mixtral / Qwen3-MoE experts as
3-D parameters `mlp.experts.gate_up_proj [E, 2I, H]` (gate rows first, then up) and
`mlp.experts.down_proj [E, H, I]`, and PEFT (`lora.ParamWrapper`; read from PEFT 0.21) puts
LoRA on them through `target_parameters`. Per targeted parameter it saves one pair under the
experts module: `lora_A.weight [r*E, in]` and `lora_B.weight [out, r*E]`; expert e's delta
(nn.Linear orientation, [out, in]) is `scaling * B[:, e::E] @ A[e*r:(e+1)*r]` (A's rows are expert-major,
B's columns rank-major). Several parameters on one module are nested wrappers, one
`.base_layer` infix per level: the parameter registered first (gate_up_proj) is innermost.
Such an adapter is exactly per-expert LoRA of rank r, so on load we convert it into the
per-expert `LoRAModuleWeights` of `experts.N.gate_proj/up_proj/down_proj` (or `w1/w3/w2`):
gate_proj and up_proj share A_e and take B_e's first and last I rows. As in PEFT,
`rank_pattern`/`alpha_pattern` apply to the parameter name (`...experts.down_proj`), while
`layers_to_transform` and `exclude_modules` do not apply to parameters. Parameters other than
the fused expert pair (the router, 2-D `.weight` targets) and shapes that do not split into the
base model's experts are refused with a `LoRAError`; `fan_in_fan_out` does not change this
math (PEFT's ParamWrapper never transposes).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# checkpoint expert namings (serving.models.layers.EXPERT_NAMINGS), for adapters trained on
# one naming and served on a checkpoint that uses the other
_EXPERT_ALIASES = (("block_sparse_moe.experts.{e}.w1", "mlp.experts.{e}.gate_proj"),
                   ("block_sparse_moe.experts.{e}.w3", "mlp.experts.{e}.up_proj"),
                   ("block_sparse_moe.experts.{e}.w2", "mlp.experts.{e}.down_proj"))
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# transformers 5's fused expert parameters in their registration order (MixtralExperts,
# Qwen3MoeExperts): PEFT nests one ParamWrapper per targeted parameter in this order
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# fused parameter -> the per-expert projections (mlp naming) its output rows split into, in order
_FUSED_SPLIT = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class LoRAError(ValueError):
    """An adapter we cannot serve; the message names the adapter, the problem and the fix."""


@dataclass(frozen=True)
class TargetShape:
    """What a base-model linear looks like to an adapter: in and out features."""

    in_features: int
    out_features: int


@dataclass
class LoRAConfig:
    """The fields of PEFT's `LoraConfig` that decide the math (others are ignored)."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str | None
    use_rslora: bool = False
    # only transposes Conv1D (GPT-2 style) base weights; the saved A [r, in] / B [out, r] and our
    # nn.Linear-style bases are the same either way (PEFT itself turns it off for nn.Linear)
    fan_in_fan_out: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    base_model_name_or_path: str | None = None
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    target_parameters: list[str] | None = None
    peft_type: str = "LORA"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "LoRAConfig":
        peft_type = str(d.get("peft_type") or "LORA").upper()
        if peft_type != "LORA":
            raise LoRAError(f"{where}: peft_type is {peft_type}; only LoRA adapters (peft_type LORA) are served")
        try:
            r = int(d["r"])
            alpha = float(d.get("lora_alpha", 8))
        except (KeyError, TypeError, ValueError) as e:
            raise LoRAError(f"{where}: adapter_config.json needs an integer 'r' and a number 'lora_alpha' ({e})") from e
        if r <= 0:
            raise LoRAError(f"{where}: r must be positive, got {r}")
        tm = d.get("target_modules")
        if isinstance(tm, (list, tuple, set)):
            tm = sorted(str(t) for t in tm)
        tp = d.get("target_parameters")
        if tp is not None and not (isinstance(tp, (list, tuple)) and all(isinstance(t, str) for t in tp)):
            raise LoRAError(f"{where}: target_parameters must be a list of parameter names, got {tp!r}")
        return cls(
            r=r, lora_alpha=alpha, target_modules=tm, use_rslora=bool(d.get("use_rslora", False)),
            fan_in_fan_out=bool(d.get("fan_in_fan_out", False)),
            layers_to_transform=d.get("layers_to_transform"), layers_pattern=d.get("layers_pattern"),
            rank_pattern={str(k): int(v) for k, v in (d.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (d.get("alpha_pattern") or {}).items()},
            exclude_modules=d.get("exclude_modules"), bias=str(d.get("bias") or "none"),
            base_model_name_or_path=d.get("base_model_name_or_path"), use_dora=bool(d.get("use_dora", False)),
            modules_to_save=list(d.get("modules_to_save") or []) or None,
            target_parameters=list(tp or []) or None, peft_type=peft_type,
        )

    # --- PEFT's matching rules (peft.tuners.tuners_utils.check_target_module_exists) ----
    def targets(self, key: str) -> bool:
        """Would PEFT put a LoRA layer on module `key` (e.g. `model.layers.0.self_attn.q_proj`)?"""
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, key):
                    return False
            elif key in ex or any(key.endswith(f".{x}") for x in ex):
                return False
        tm = self.target_modules
        if tm is None:
            return False
        if isinstance(tm, str):
            return tm == "all-linear" or re.fullmatch(tm, key) is not None
        if key in tm:
            return True
        found = any(key.endswith(f".{t}") for t in tm)
        idx = self.layers_to_transform
        using = idx is not None and (len(idx) != 0 if isinstance(idx, list) else True)
        if not (using and found):
            return found
        pats = self.layers_pattern
        match = None
        if not pats:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for p in [pats] if isinstance(pats, str) else pats:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        layer = int(match.group("idx"))
        return layer == idx if isinstance(idx, int) else layer in idx

    def selects_parameter(self, key: str) -> bool:
        """Would PEFT wrap parameter `key` (e.g. `model.layers.0.mlp.experts.down_proj`)?

        peft.tuners.tuners_utils.BaseTuner._inject_parameters: the full name or a `.`-suffix;
        `layers_to_transform` and `exclude_modules` are not consulted for parameters."""
        tp = self.target_parameters or []
        return key in tp or any(key.endswith(f".{t}") for t in tp)

    def rank_and_scaling(self, key: str) -> tuple[int, float]:
        """Rank and scaling of module `key`: `rank_pattern`/`alpha_pattern` first match, else r/alpha."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str:
    # peft.utils.other.get_pattern_key
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


@dataclass
class LoRAModuleWeights:
    """One module's low-rank pair: `a [r, in]`, `b [out, r]`, delta W = scaling · b @ a."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class LoRAAdapter:
    """A validated adapter in host memory; `modules` is keyed by our model's HF module names."""

    name: str
    source: str
    path: Path
    config: LoRAConfig
    modules: dict[str, LoRAModuleWeights]

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values())


# ----------------------------------------------------------------------------- sources


def parse_source(source: str) -> tuple[str, str | None]:
    """`"org/name@rev"` -> `("org/name", "rev")`; a local path is returned whole."""
    if Path(source).expanduser().exists() or "@" not in source:
        return source, None
    src, _, rev = source.rpartition("@")
    return src, (rev or None)


def resolve_adapter_dir(source: str, revision: str | None = None, token: str | None = None) -> Path:
    """A local adapter directory as is; a Hub repo id (optionally `@revision`) downloaded.

    Only the adapter's config and safetensors are fetched (through `HF_ENDPOINT` and the HF cache).
    """
    src, rev = parse_source(source)
    rev = revision or rev
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if src.startswith((".", "/", "~")) or p.exists() or src.count("/") != 1:
        raise LoRAError(f"adapter source {source!r} is not a directory and not a Hub repo id (org/name[@revision])")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        from hubdeploy.serving.hub import _cache_dir  # HF_ENDPOINT / HF_HOME as set now, not at import

        d = snapshot_download(src, revision=rev, token=token or os.environ.get("HF_TOKEN") or None,
                              allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "adapter_model.bin"],
                              endpoint=os.environ.get("HF_ENDPOINT") or None, cache_dir=_cache_dir())
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise LoRAError(f"adapter repo {src!r}{'@' + rev if rev else ''} was not found on the Hub "
                        f"(or needs a token): {type(e).__name__}") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise LoRAError(f"could not download adapter {src!r}: {type(e).__name__}: {e}") from e
    return Path(d)


# ----------------------------------------------------------------------------- reading


def read_adapter_config(path: Path) -> LoRAConfig:
    """Parse `adapter_config.json` and refuse features we do not serve."""
    f = path / CONFIG_FILE
    where = str(path)
    if not f.is_file():
        raise LoRAError(f"{where}: missing {CONFIG_FILE}; a PEFT LoRA adapter directory needs {CONFIG_FILE} "
                        f"and {WEIGHTS_FILE}")
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoRAError(f"{where}: {CONFIG_FILE} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise LoRAError(f"{where}: {CONFIG_FILE} must hold a JSON object")
    cfg = LoRAConfig.from_dict(raw, where)
    if cfg.use_dora:
        raise LoRAError(f"{where}: DoRA adapters (use_dora: true) are not supported; merge the adapter into the "
                        "base model or retrain it as plain LoRA")
    if cfg.modules_to_save:
        raise LoRAError(f"{where}: modules_to_save {cfg.modules_to_save} (fully trained copies of base modules) "
                        "is not supported; serve a merged model instead")
    if cfg.bias != "none":
        raise LoRAError(f"{where}: bias={cfg.bias!r} is not supported; only bias='none' adapters are served")
    for t in cfg.target_parameters or []:
        leaf = t.rpartition(".")[2]
        if leaf not in FUSED_EXPERT_PARAMS:
            why = ("LoRA on the MoE router is not supported" if re.search(r"(^|\.)(gate|router)(\.|$)", t) else
                   "only the fused MoE expert parameters " + " and ".join(FUSED_EXPERT_PARAMS) +
                   " (transformers 5 Mixtral / Qwen3-MoE `mlp.experts`) are served")
            raise LoRAError(f"{where}: target_parameters entry {t!r}: {why}; retrain without it or use "
                            "target_modules for linear layers")
    if cfg.target_modules is None and not cfg.target_parameters:
        raise LoRAError(f"{where}: adapter_config.json has neither target_modules nor target_parameters")
    return cfg


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    f = path / WEIGHTS_FILE
    if not f.is_file():
        if (path / "adapter_model.bin").is_file():
            raise LoRAError(f"{path}: only adapter_model.bin (a pickle) is present; we never unpickle downloaded "
                            f"files. Convert it to {WEIGHTS_FILE} (safetensors.torch.save_file)")
        raise LoRAError(f"{path}: missing {WEIGHTS_FILE}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoRAError(f"{path}: {WEIGHTS_FILE} is corrupt or truncated ({e}); re-download or re-save it") from e


def _target_for(module: str, targets: Mapping[str, TargetShape]) -> str | None:
    """Our HF module name for an adapter's module name (the other expert naming accepted)."""
    if module in targets:
        return module
    m = re.match(r"^(?P<pre>.*\.)(?P<rest>(?:block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\.\w+)$", module)
    if m:
        e = m.group("e")
        for x, y in _EXPERT_ALIASES:
            for a, b in ((x, y), (y, x)):
                if m.group("rest") == a.format(e=e):
                    alt = m.group("pre") + b.format(e=e)
                    if alt in targets:
                        return alt
    return None


def _why_not_target(module: str) -> str:
    leaf = module.rsplit(".", 1)[-1]
    if leaf in ("embed_tokens", "wte", "lm_head") or "embed" in leaf:
        return "LoRA on embeddings / lm_head is not supported"
    if leaf == "gate" or module.endswith(".router"):
        return "LoRA on the MoE router gate is not supported"
    return "the base model has no such linear (is the adapter for another base model?)"


def _split_wrapper_depth(module: str) -> tuple[str, int]:
    """`a.experts.base_layer.base_layer` -> (`a.experts`, 2): PEFT's nesting of ParamWrappers."""
    depth = 0
    while module.endswith(".base_layer"):
        module = module[: -len(".base_layer")]
        depth += 1
    return module, depth


def _experts_of(where: str, module: str, targets: Mapping[str, TargetShape]) -> tuple[list[str], int, int]:
    """The base model's experts under `module` (`...mlp.experts`): per-expert name prefixes
    (adapter-side mlp naming), hidden size H and expert intermediate size I."""
    names: list[str] = []
    while _target_for(f"{module}.{len(names)}.gate_proj", targets) is not None:
        names.append(f"{module}.{len(names)}")
    if not names:
        raise LoRAError(f"{where}: targets the fused expert parameters of {module}, but the base model has no MoE "
                        "experts there (is the adapter for another base model?)")
    w1 = targets[_target_for(f"{names[0]}.gate_proj", targets)]  # type: ignore[index]
    return names, w1.in_features, w1.out_features


def _fused_expert_pairs(
    where: str, cfg: LoRAConfig, module: str, depth: int, levels: int, a: torch.Tensor, b: torch.Tensor,
    targets: Mapping[str, TargetShape],
) -> tuple[str, int, float, list[tuple[str, torch.Tensor, torch.Tensor]]] | None:
    """PEFT's LoRA on one fused expert parameter -> per-expert (module, A_e, B_e) pairs.

    `depth` is this pair's nesting level, `levels` how many levels the file holds for `module`.
    Returns (parameter key, rank, scaling, pairs), or None when `target_parameters` selects no
    parameter of `module` (PEFT would not load these weights either)."""
    chosen = [p for p in FUSED_EXPERT_PARAMS if cfg.selects_parameter(f"{module}.{p}")]
    if chosen and not depth and not module.endswith(".experts") and _target_for(f"{module}.0.gate_proj",
                                                                                 targets) is None:
        chosen = []  # e.g. a bare "down_proj" entry and a plain linear `...mlp.down_proj`: not an experts module
    if not chosen:
        if depth:
            raise LoRAError(f"{where}: weights under {module}{'.base_layer' * depth} belong to a nested PEFT "
                            f"ParamWrapper, but target_parameters {cfg.target_parameters} selects no parameter of "
                            f"{module}; the config does not belong to the file")
        return None
    if levels != len(chosen):
        raise LoRAError(f"{where}: {module} holds LoRA weights of {levels} nested PEFT ParamWrapper(s) (.base_layer "
                        f"levels), but target_parameters selects {len(chosen)} parameter(s) there {chosen}, one "
                        "wrapper each; the config does not belong to the file")
    param = chosen[len(chosen) - 1 - depth]  # the first registered parameter is the innermost wrapper
    key = f"{module}.{param}"
    experts, hidden, inter = _experts_of(where, module, targets)
    E = len(experts)
    n_in, n_out = (hidden, 2 * inter) if param == "gate_up_proj" else (inter, hidden)
    rank, scaling = cfg.rank_and_scaling(key)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise LoRAError(f"{where}: {key} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected "
                        f"[r*E, in] and [out, r*E] with the same r*E")
    if a.shape[1] != n_in or b.shape[0] != n_out:
        raise LoRAError(
            f"{where}: {key} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the base model's {param} "
            f"has in={n_in}, out={n_out} (lora_A [r*E, {n_in}], lora_B [{n_out}, r*E] expected): the adapter was "
            f"trained for another base model ({cfg.base_model_name_or_path or 'unknown base'}) or is corrupt")
    if a.shape[0] != rank * E:
        raise LoRAError(
            f"{where}: {key} has {a.shape[0]} LoRA rows but rank {rank} (r / rank_pattern) x {E} experts of the base "
            f"model needs {rank * E}: it cannot be split into per-expert rank-{rank} pairs (an adapter for a model "
            "with another number of experts, or a config that does not belong to the file)")
    a_e = a.reshape(E, rank, n_in)  # expert-major rows
    b_e = b.reshape(n_out, rank, E)  # rank-major columns: expert e is b[:, e::E]
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for e, prefix in enumerate(experts):
        parts = _FUSED_SPLIT[param]
        rows = n_out // len(parts)
        for j, proj in enumerate(parts):
            pairs.append((f"{prefix}.{proj}", a_e[e], b_e[j * rows:(j + 1) * rows, :, e]))
    return key, rank, scaling, pairs


def load_adapter(
    name: str,
    source: str,
    targets: Mapping[str, TargetShape],
    max_lora_rank: int,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    token: str | None = None,
) -> LoRAAdapter:
    """Read `source` (dir or `org/name[@rev]`), check it against the base model's `targets`
    (HF module name -> shapes) and `max_lora_rank`, and return its weights in host memory.

    LoRA on fused expert parameters (`target_parameters`) comes back as per-expert modules."""
    path = resolve_adapter_dir(source, revision, token)
    where = f"adapter {name!r} ({source})"
    cfg = read_adapter_config(path)
    tensors = _load_tensors(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if "lora_embedding_" in key:
            raise LoRAError(f"{where}: embedding LoRA ({key}) is not supported")
        if "lora_magnitude_vector" in key:
            raise LoRAError(f"{where}: DoRA weights ({key}) are not supported")
        if "modules_to_save" in key:
            raise LoRAError(f"{where}: modules_to_save weights ({key}) are not supported")
        m = _KEY.match(key)
        if m is None:
            raise LoRAError(f"{where}: unexpected tensor {key!r} in {WEIGHTS_FILE}: only lora_A/lora_B weights of "
                            "plain LoRA are served (no biases, no full-weight copies)")
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = t
    if not pairs:
        raise LoRAError(f"{where}: {WEIGHTS_FILE} holds no lora_A/lora_B weights")
    modules: dict[str, LoRAModuleWeights] = {}
    origin: dict[str, str] = {}  # our module -> the adapter module/parameter it came from
    ignored: list[str] = []

    def add(src: str, module: str, a: torch.Tensor, b: torch.Tensor, rank: int, scaling: float) -> None:
        ours = _target_for(module, targets)
        if ours is None:
            raise LoRAError(f"{where}: targets {module}: {_why_not_target(module)}")
        if ours in modules:
            raise LoRAError(f"{where}: {ours} gets LoRA weights twice (from {origin[ours]} and {src}); PEFT would "
                            "not save such a file")
        if rank > max_lora_rank:
            raise LoRAError(f"{where}: rank {rank} ({src}) exceeds max_lora_rank={max_lora_rank}; restart with "
                            f"--max-lora-rank {rank} or larger")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoRAError(f"{where}: {src} holds NaN or inf values")
        modules[ours] = LoRAModuleWeights(a.to(dtype).contiguous(), b.to(dtype).contiguous(), float(scaling))
        origin[ours] = src

    levels: dict[str, int] = {}  # wrapper levels per module in the file (PEFT saves every level)
    for module in pairs:
        base, depth = _split_wrapper_depth(module)
        levels[base] = max(levels.get(base, 0), depth + 1)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise LoRAError(f"{where}: module {module} has no {missing} weight; the file is incomplete")
        a, b = ab["A"], ab["B"]
        base, depth = _split_wrapper_depth(module)
        fused = (_fused_expert_pairs(where, cfg, base, depth, levels[base], a, b, targets)
                 if cfg.target_parameters else None)
        if fused is None and depth:
            raise LoRAError(f"{where}: {module} holds the weights of a PEFT ParamWrapper, but adapter_config.json "
                            "has no target_parameters; the config does not belong to the file")
        if fused is not None:
            key, rank, scaling, expert_pairs = fused
            for expert_module, a_e, b_e in expert_pairs:
                add(key, expert_module, a_e, b_e, rank, scaling)
            continue
        if not cfg.targets(module):
            ignored.append(module)  # PEFT does not load weights its config does not target
            continue
        ours = _target_for(module, targets)
        if ours is None:
            raise LoRAError(f"{where}: targets {module}: {_why_not_target(module)}")
        shape = targets[ours]
        rank, scaling = cfg.rank_and_scaling(module)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoRAError(f"{where}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected "
                            "[r, in] and [out, r] with the same r")
        if a.shape[1] != shape.in_features or b.shape[0] != shape.out_features:
            raise LoRAError(
                f"{where}: {module} expects a base linear of in={a.shape[1]}, out={b.shape[0]} but the base model's "
                f"has in={shape.in_features}, out={shape.out_features}: the adapter was trained for another base model "
                f"({cfg.base_model_name_or_path or 'unknown base'})")
        if a.shape[0] != rank:
            raise LoRAError(f"{where}: {module} has rank {a.shape[0]} but adapter_config.json says {rank} "
                            "(r / rank_pattern); the files do not belong together")
        add(module, module, a, b, rank, scaling)
    if ignored:
        log.warning("%s: ignoring weights of %d module(s) its target_modules do not select (PEFT ignores them "
                    "too), e.g. %s", where, len(ignored), ignored[0])
    if not modules:
        raise LoRAError(f"{where}: none of its weights match its target_modules {cfg.target_modules!r}"
                        + (f" or target_parameters {cfg.target_parameters!r}" if cfg.target_parameters else ""))
    return LoRAAdapter(name=name, source=source, path=path, config=cfg, modules=modules)


__all__ = ["LoRAAdapter", "LoRAConfig", "LoRAError", "LoRAModuleWeights", "TargetShape", "load_adapter",
           "parse_source", "read_adapter_config", "resolve_adapter_dir"]
