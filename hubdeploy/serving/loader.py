"""Load a Hub-layout checkpoint (safetensors, fp16/bf16/fp32, AWQ GEMM or llm-compressor's
compressed-tensors W4A16 `pack-quantized`) into our decoder.

Streaming: tensors are read one at a time with `safetensors.safe_open` and copied into the
model's (fused) parameters on the target device; AWQ parts wait only until their fused
module (qkv, gate|up, one layer's experts) is complete, then are repacked and dropped, so
host memory never holds a second copy of the model.

Which linears are 4-bit is decided by the checkpoint's tensors (`<name>.qweight` for AWQ,
`<name>.weight_packed` for compressed-tensors), which is what `modules_to_not_convert` /
`ignore` meant when the checkpoint was written. Both formats end in the same kernel layout
(`kernels.awq.AWQPacked`): AWQ through `awq_repack`, compressed-tensors through
`kernels.compressed_tensors.ct_repack` (`PackedFormat` below says which tensors each has).
Expert tensors may be named `block_sparse_moe.experts.N.w1|w3|w2`,
`mlp.experts.N.gate_proj|up_proj|down_proj` or, as llm-compressor writes Mixtral,
`block_sparse_moe.experts.N.gate_proj|up_proj|down_proj` (read as w1|w3|w2).

dtype: `None` means float32 on the CPU (exact comparison against transformers; the CPU
path is for tests and tiny models) and "auto" on CUDA; "auto" means the config's
`torch_dtype`, except AWQ which computes in float16 (its scales' dtype; compressed-tensors'
scales are in the config's dtype). bf16/fp16/fp32 may
be asked for explicitly.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from hubdeploy.kernels.awq import concat_out
from hubdeploy.kernels.awq_format import PACK_FACTOR
from hubdeploy.kernels.compressed_tensors import ct_repack_tensors, moe_from_packed
from hubdeploy.serving.compressed_tensors import W4A16Scheme, is_compressed_tensors, parse_w4a16
from hubdeploy.serving.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig
from hubdeploy.serving.models import CausalLM, build_model, check_supported
from hubdeploy.serving.models.layers import EXPERT_NAMINGS, Linear, MoE

# Tensors some checkpoints carry that carry no weights we need.
IGNORED_TENSORS = re.compile(r"(rotary_emb\.inv_freq|\.rotary_emb\.|_cos_cached|_sin_cached)$")


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors we cannot load; names the file and the tensor."""


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """Compute dtype, the one rule: explicit wins; None (the engine's "auto") -> float32 off CUDA,
    else "auto"; "auto" -> the config's (float16 for AWQ)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        dtype = "auto"
    if dtype == "auto":
        if cfg.quant is not None and cfg.quant.is_awq:
            return torch.float16
        return _DTYPES.get(str(cfg.torch_dtype).replace("torch.", ""), torch.float16)
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r} is not supported; use auto, float32, float16 or bfloat16") from None


# ----------------------------------------------------------------------------- config checks


def check_quantization(cfg: ModelConfig, model_dir: Path) -> None:
    """Raise `ConfigError` for any quantization we do not serve (what, where, what to do)."""
    q = cfg.quant
    if q is None:
        return
    src = model_dir / q.source
    raw = q.raw
    method = q.method
    # gptqmodel writes AWQ with `method: awq` / `format: awq` beside its own quant_method
    if method != "awq" and "awq" in (str(raw.get("method", "")).lower(), str(raw.get("format", "")).lower()):
        method = "awq"
        q.method = "awq"
        if q.version in (None, "awq"):
            q.version = str(raw.get("checkpoint_format") or "gemm").lower()
    if is_compressed_tensors(method):
        try:
            scheme = parse_w4a16(raw)
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None
        q.bits, q.group_size, q.zero_point = 4, scheme.group_size, not scheme.symmetric
        return
    if method != "awq":
        raise ConfigError(
            f"{src}: quantization method {method!r} is not supported; we serve AWQ 4-bit (GEMM), "
            "compressed-tensors W4A16 (llm-compressor, pack-quantized) and unquantized fp16/bf16/fp32 "
            "checkpoints."
        )
    if q.bits != 4:
        raise ConfigError(f"{src}: AWQ with bits={q.bits} is not supported; only 4-bit AWQ is served.")
    if not q.zero_point:
        raise ConfigError(f"{src}: AWQ without zero points (zero_point=false) is not supported.")
    if q.version not in (None, "gemm"):
        raise ConfigError(
            f"{src}: AWQ version {q.version!r} is not supported; only the GEMM packing is "
            "(AutoAWQ version: GEMM)."
        )
    if not q.group_size or q.group_size <= 0 or q.group_size % PACK_FACTOR:
        raise ConfigError(
            f"{src}: AWQ group_size {q.group_size} is not supported; the kernel needs a positive "
            "multiple of 8 that divides every quantized layer's in_features (e.g. 128)."
        )


def check_config(cfg: ModelConfig, model_dir: Path) -> None:
    if cfg.trust_remote_code_only:
        raise ConfigError(
            f"{model_dir / 'config.json'}: architecture {cfg.architecture or '(none)'} is defined by custom "
            f"code (auto_map) and needs trust_remote_code, which we never run. Supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    try:
        check_supported(cfg)
    except ConfigError as e:
        raise ConfigError(f"{model_dir / 'config.json'}: {e}") from None
    check_quantization(cfg, model_dir)


# ----------------------------------------------------------------------------- files


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hub-layout checkpoint (sharded via its index, or single)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    bins = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = f" (found {', '.join(bins[:3])}: pickle .bin checkpoints are not loaded, convert to safetensors)" if bins else ""
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json{hint}")


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Tensor name -> (file, shape, dtype) from the safetensors headers only (no data read)."""
    out: dict[str, TensorInfo] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    if name in out:
                        raise CheckpointError(f"tensor {name} appears in both {out[name].file.name} and {path.name}")
                    out[name] = TensorInfo(path, tuple(sl.get_shape()), str(sl.get_dtype()))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises SafetensorError / OSError on a bad header
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors header ({e})") from None
    return out


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PackedFormat:
    """One 4-bit checkpoint format: the tensors (leaves) of a quantized linear with their shapes
    (`_finish` turns them into our kernel layout)."""

    name: str  # for messages
    marker: str  # the leaf whose presence makes a module 4-bit
    int32_leaves: tuple[str, ...]
    shapes: Callable[[int, int, int], dict[str, tuple[int, ...]]]  # (in, out, group) -> leaf -> shape


def _awq_shapes(n_in: int, n_out: int, group: int) -> dict[str, tuple[int, ...]]:
    g = n_in // group
    return {"qweight": (n_in, n_out // PACK_FACTOR), "qzeros": (g, n_out // PACK_FACTOR), "scales": (g, n_out)}


AWQ_FORMAT = PackedFormat("AWQ", "qweight", ("qweight", "qzeros"), _awq_shapes)


# the leaf that marks a 4-bit linear -> its format's name, for every format we read
PACKED_MARKERS = {"qweight": "AWQ", "weight_packed": "compressed-tensors"}


def ct_format(scheme: W4A16Scheme, unpacked_zeros: bool = False) -> PackedFormat:
    """compressed-tensors W4A16: a zero point per group only when asymmetric, packed along out
    (int32 `[out/8, in/g]`) or, as written before compressed-tensors 0.10, int8 `[out, in/g]`."""

    def shapes(n_in: int, n_out: int, group: int) -> dict[str, tuple[int, ...]]:
        g = n_in // group
        out = {"weight_packed": (n_out, n_in // PACK_FACTOR), "weight_scale": (n_out, g), "weight_shape": (2,)}
        if not scheme.symmetric:
            out["weight_zero_point"] = (n_out, g) if unpacked_zeros else (n_out // PACK_FACTOR, g)
        return out

    int32 = ("weight_packed",) if unpacked_zeros else ("weight_packed", "weight_zero_point")
    return PackedFormat("compressed-tensors", "weight_packed", int32, shapes)


@dataclass
class Slot:
    """Where one checkpoint tensor goes."""

    kind: str  # "param", "linear", "linear_awq", "moe", "moe_awq"
    shape: tuple[int, ...]
    target: Any  # tensor (param/linear/moe plain) or module (awq)
    part: Any = None  # linear_awq: part index; moe*: (expert, role)
    leaf: str = ""


@dataclass
class _Pending:
    needed: int
    got: dict[Any, dict[str, torch.Tensor]] = field(default_factory=dict)
    count: int = 0


def _linear_slots(lin: Linear, quantized: bool, group: int | None, fmt: PackedFormat, plan: dict[str, Slot]) -> None:
    start = 0
    for idx, (name, n) in enumerate(lin.hf_parts):
        sl = slice(start, start + n)
        if quantized:
            _check_packed_shape(name, lin.in_features, n, group, fmt)
            for leaf, shp in fmt.shapes(lin.in_features, n, group).items():
                plan[f"{name}.{leaf}"] = Slot("linear_awq", shp, lin, idx, leaf)
        else:
            plan[name + ".weight"] = Slot("linear", (n, lin.in_features), lin.weight.data[sl])
        if lin.bias is not None:
            plan[name + ".bias"] = Slot("linear", (n,), lin.bias.data[sl])
        start += n


def _check_packed_shape(name: str, in_features: int, out_features: int, group: int | None, fmt: PackedFormat) -> None:
    if not group or in_features % group:
        raise ConfigError(
            f"{fmt.name} group_size {group} does not divide in_features {in_features} of {name}; the kernel "
            "needs a group size that divides every quantized layer's input dimension."
        )
    if out_features % PACK_FACTOR:
        raise ConfigError(f"{name}: out_features {out_features} is not a multiple of 8, cannot be {fmt.name}-packed "
                          "for the kernels")


def build_plan(model: CausalLM, group: int | None, tied: bool, fmt: PackedFormat = AWQ_FORMAT) -> dict[str, Slot]:
    """Every tensor the checkpoint must hold -> where it goes in `model` (4-bit linears in `fmt`)."""
    plan: dict[str, Slot] = {}
    plan["model.embed_tokens.weight"] = Slot("param", tuple(model.embed_tokens.weight.shape), model.embed_tokens.weight.data)
    plan["model.norm.weight"] = Slot("param", tuple(model.norm.weight.shape), model.norm.weight.data)
    if model.lm_head is not None and not tied:
        _linear_slots(model.lm_head, False, group, fmt, plan)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = getattr(layer, norm).weight
            plan[p + norm + ".weight"] = Slot("param", tuple(w.shape), w.data)
        attn = layer.self_attn
        if attn.q_norm is not None:
            for nm in ("q_norm", "k_norm"):
                w = getattr(attn, nm).weight
                plan[p + f"self_attn.{nm}.weight"] = Slot("param", tuple(w.shape), w.data)
        for lin in (attn.qkv_proj, attn.o_proj):
            _linear_slots(lin, lin.quantized, group, fmt, plan)
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            _linear_slots(mlp.gate, False, group, fmt, plan)
            for e in range(mlp.num_experts):
                for role in ("w1", "w3", "w2"):
                    name = mlp.expert_name(e, role)
                    n_in, n_out = (mlp.hidden, mlp.inter) if role != "w2" else (mlp.inter, mlp.hidden)
                    if mlp.quantized:
                        _check_packed_shape(name, n_in, n_out, group, fmt)
                        for leaf, shp in fmt.shapes(n_in, n_out, group).items():
                            plan[f"{name}.{leaf}"] = Slot("moe_awq", shp, mlp, (e, role), leaf)
                    else:
                        if role == "w2":
                            dst = mlp.w2.data[e]
                        else:
                            off = 0 if role == "w1" else mlp.inter
                            dst = mlp.w13.data[e, off:off + mlp.inter]
                        plan[name + ".weight"] = Slot("moe", (n_out, n_in), dst)
        else:
            for lin in (mlp.gate_up_proj, mlp.down_proj):
                _linear_slots(lin, lin.quantized, group, fmt, plan)
    return plan


# ----------------------------------------------------------------------------- load

# llm-compressor's Mixtral naming: block_sparse_moe.experts.N.gate_proj|up_proj|down_proj
_MIXED_EXPERT = re.compile(r"^(.*\.block_sparse_moe\.experts\.\d+\.)(gate_proj|up_proj|down_proj)(\..+)$")
_MIXED_ROLE = {hf: role for hf, role in EXPERT_NAMINGS["mlp"].items()}


def expert_aliases(names: set[str]) -> dict[str, str]:
    """Checkpoint name -> the name our plan uses, for expert tensors under llm-compressor's mix
    of namings (`block_sparse_moe` blocks with `gate_proj|up_proj|down_proj` experts); empty
    for every other checkpoint."""
    out = {}
    for n in names:
        m = _MIXED_EXPERT.match(n)
        if m:
            out[n] = f"{m.group(1)}{_MIXED_ROLE[m.group(2)]}{m.group(3)}"
    return out


def _detect_moe_prefix(cfg: ModelConfig, names: set[str]) -> str | None:
    if not cfg.is_moe:
        return None
    for prefix in EXPERT_NAMINGS:
        if any(f".{prefix}.experts." in n for n in names):
            return prefix
    return None


def _packed_format(
    cfg: ModelConfig, headers: dict[str, TensorInfo]
) -> tuple[PackedFormat | None, int | None, W4A16Scheme | None]:
    """The checkpoint's 4-bit format (None: unquantized), its group size, and for
    compressed-tensors its scheme (already validated by `check_quantization`)."""
    q = cfg.quant
    if q is None:
        return None, None, None
    if q.is_awq:
        return AWQ_FORMAT, q.group_size, None
    scheme = parse_w4a16(q.raw)
    unpacked = any(n.endswith(".weight_zero_point") and i.dtype in ("I8", "int8") for n, i in headers.items())
    return ct_format(scheme, unpacked), scheme.group_size, scheme


def load_model(
    model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[CausalLM, ModelConfig]:
    """Build the decoder for `model_dir` (Hub layout) and stream its weights onto `device`."""
    model_dir = Path(model_dir)
    device = torch.device(device)
    cfg = ModelConfig.from_dir(model_dir)
    check_config(cfg, model_dir)
    files = checkpoint_files(model_dir)
    headers = read_headers(files)
    aliases = expert_aliases(set(headers))
    headers = {aliases.get(n, n): info for n, info in headers.items()}
    names = set(headers)
    declared, group, scheme = _packed_format(cfg, headers)
    fmt = declared or AWQ_FORMAT
    where = model_dir / (cfg.quant.source if cfg.quant else "config.json")
    for marker, other in PACKED_MARKERS.items():
        found = sorted(n for n in names if n.endswith("." + marker))
        if found and (declared is None or declared.marker != marker):
            said = (f"{where} declares {declared.name}" if declared else
                    f"config.json has no {other} quantization_config (nor quant_config.json)")
            raise CheckpointError(
                f"{headers[found[0]].file}: tensor {found[0]} is {other}-packed but {said}; "
                "fix the config or use an unquantized checkpoint."
            )
    g_idx = sorted(n for n in names if n.endswith(".weight_g_idx"))
    if g_idx:
        raise CheckpointError(
            f"{headers[g_idx[0]].file}: tensor {g_idx[0]} reorders the input channels (compressed-tensors "
            "actorder 'group'), which is not served; quantize with actorder 'weight' or none."
        )
    qnames = {n[: -len(fmt.marker) - 1] for n in names if n.endswith("." + fmt.marker)}
    if declared is not None and not qnames:
        raise CheckpointError(
            f"{where} declares {declared.name} but no tensor in "
            f"{', '.join(sorted({p.name for p in files}))} is {declared.name}-packed (no *.{declared.marker}); "
            "fix the config or the weights."
        )
    if scheme is not None:
        wrong = sorted(n for n in qnames if scheme.ignored(n))
        if wrong:
            raise CheckpointError(
                f"{headers[f'{wrong[0]}.{fmt.marker}'].file}: {wrong[0]} is listed in quantization_config.ignore "
                "but stored quantized; the config and the weights disagree."
            )
    moe_prefix = _detect_moe_prefix(cfg, names)
    # Tied: config says so, or lm_head.weight is simply absent (some exports drop it).
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in names
    if tied and not cfg.tie_word_embeddings:
        cfg.tie_word_embeddings = True
    compute_dtype = resolve_dtype(dtype, cfg, device)

    def quantized(name: str) -> bool:
        return name in qnames

    model = build_model(cfg, compute_dtype, device, quantized=quantized, moe_prefix=moe_prefix)
    plan = build_plan(model, group, tied, fmt)

    stray = sorted(n for n in qnames if f"{n}.{fmt.marker}" not in plan)
    if stray:
        raise CheckpointError(
            f"{headers[f'{stray[0]}.{fmt.marker}'].file}: {stray[0]} is stored 4-bit ({fmt.name}) but the engine "
            "runs it unquantized (router gates and lm_head always are); quantize the model with it left out "
            "(ignore / modules_to_not_convert)."
        )
    missing = sorted(n for n in plan if n not in names)
    if missing:
        where_files = ", ".join(sorted({p.name for p in files}))
        hint = ""
        marker = "." + fmt.marker
        if any(n.endswith(marker) and n[: -len(marker)] + ".weight" in names for n in missing):
            hint = (f" (the checkpoint has plain .weight where {fmt.name} tensors were expected; the fused "
                    "parts must agree)")
        raise CheckpointError(
            f"{model_dir}: missing tensor(s) in {where_files}: {', '.join(missing[:8])}"
            f"{' …' if len(missing) > 8 else ''} ({len(missing)} in all){hint}"
        )
    extra = sorted(n for n in names if n not in plan and not IGNORED_TENSORS.search(n)
                   and not (tied and n == "lm_head.weight"))
    if extra:
        f0 = headers[extra[0]].file.name
        raise CheckpointError(
            f"{model_dir}: unexpected tensor(s) not used by {cfg.architecture}: "
            f"{', '.join(extra[:8])}{' …' if len(extra) > 8 else ''} ({len(extra)} in all, first in {f0}); "
            "is config.json from the same model?"
        )
    for name, slot in plan.items():
        info = headers[name]
        if info.shape != slot.shape:
            raise CheckpointError(
                f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {list(slot.shape)} "
                f"from config.json ({cfg.architecture})"
            )
        if slot.leaf in fmt.int32_leaves and info.dtype not in ("I32", "int32"):
            raise CheckpointError(
                f"{info.file}: tensor {name} has dtype {info.dtype}, {fmt.name} {slot.leaf} must be int32")

    _stream(plan, files, group, device, fmt, aliases)
    model.eval()
    return model, cfg


def _stream(
    plan: dict[str, Slot], files: list[Path], group: int | None, device: torch.device,
    fmt: PackedFormat = AWQ_FORMAT, aliases: dict[str, str] | None = None,
) -> None:
    """Read tensors one at a time into their slots; finish fused 4-bit modules as they complete.

    A progress bar on stderr (huggingface_hub's tqdm, so HF_HUB_DISABLE_PROGRESS_BARS turns it
    off) shows the load of a large checkpoint moving.
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    aliases = aliases or {}
    bar = hf_tqdm(total=len(plan), desc="Loading weights", unit="tensor", mininterval=0.5)
    pending: dict[int, _Pending] = {}
    for slot in plan.values():  # a 4-bit module is finished once every one of its tensors is read
        if slot.kind in ("linear_awq", "moe_awq"):
            pending.setdefault(id(slot.target), _Pending(needed=0)).needed += 1
    try:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for stored in f.keys():
                    name = aliases.get(stored, stored)
                    slot = plan.get(name)
                    if slot is None:
                        continue
                    bar.update(1)
                    try:
                        t = f.get_tensor(stored)
                    except Exception as e:
                        raise CheckpointError(f"{path}: cannot read tensor {stored} ({e})") from None
                    if slot.kind in ("param", "linear", "moe"):
                        with torch.no_grad():
                            slot.target.copy_(t)
                        continue
                    pend = pending[id(slot.target)]
                    pend.got.setdefault(slot.part, {})[slot.leaf] = t.to(device)
                    pend.count += 1
                    if pend.count == pend.needed:
                        _finish(slot.target, pend, group, fmt, path)
                        del pending[id(slot.target)]
    finally:
        bar.close()
    if pending:  # cannot happen after the missing-tensor check; guard the invariant anyway
        raise CheckpointError(f"{len(pending)} 4-bit module(s) incomplete after reading every file")


def _finish(module: Linear | MoE, pend: _Pending, group: int | None, fmt: PackedFormat, path: Path) -> None:
    if fmt is AWQ_FORMAT:  # concatenated in the checkpoint layout, repacked once
        if isinstance(module, Linear):
            parts = [pend.got[i] for i in range(len(module.hf_parts))]
            qweight = torch.cat([p["qweight"] for p in parts], dim=1)
            qzeros = torch.cat([p["qzeros"] for p in parts], dim=1)
            scales = torch.cat([p["scales"] for p in parts], dim=1)
            module.set_awq(qweight, qzeros, scales, group)
        else:
            triples = {k: (v["qweight"], v["qzeros"], v["scales"]) for k, v in pend.got.items()}
            module.set_awq(triples, group)
        return
    packed = {}
    for part, tensors in pend.got.items():  # compressed-tensors: per HF linear, then fused as AWQPacked
        try:
            packed[part] = ct_repack_tensors(tensors, group)
        except ValueError as e:
            name = module.hf_parts[part][0] if isinstance(module, Linear) else module.expert_name(*part)
            raise CheckpointError(f"{path}: {name}: {e}") from None
    if isinstance(module, Linear):
        parts = [packed[i] for i in range(len(module.hf_parts))]
        whole = parts[0]
        for p in parts[1:]:
            whole = concat_out(whole, p)
        module.set_packed(whole)
    else:
        w1, w3, w2 = ([packed[(e, r)] for e in range(module.num_experts)] for r in ("w1", "w3", "w2"))
        module.set_packed(moe_from_packed(w1, w3, w2))


__all__ = ["CheckpointError", "ConfigError", "check_config", "checkpoint_files", "expert_aliases", "load_model",
           "resolve_dtype"]
