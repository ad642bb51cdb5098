"""Test helpers: compressed-tensors W4A16 (`pack-quantized`) checkpoints written by the
`compressed-tensors` library's own code, and fp32 references dequantized by its own unpacker.

`ct_quantize_checkpoint` is what llm-compressor does for a round-to-nearest W4A16 recipe,
with the library's pieces: `calculate_qparams` on per-group min/max (the minmax observer),
`PackedQuantizationCompressor.compress` (quantize + `pack_to_int32`) per linear, and
`ModelCompressor.update_config` for config.json. `ct_dequantized_copy` runs the library's
`PackedQuantizationCompressor.decompress` on fp32 scales (exact `(q - zp) * s`) and writes a
plain checkpoint transformers loads, expert names mapped back to transformers' own.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers_forward import _copy_side_files, _read_all

# Mixtral expert namings in the wild: transformers/AutoAWQ's, llm-compressor's mix, gptqmodel's
MIXTRAL_NAMINGS = ("w", "mixed", "mlp")
_HF_TO_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_PROJ_TO_HF = {v: k for k, v in _HF_TO_PROJ.items()}


def rename_mixtral(name: str, naming: str) -> str:
    """transformers' Mixtral tensor name -> the same tensor under `naming` (see MIXTRAL_NAMINGS)."""
    if naming == "w":
        return name
    m = re.match(r"^(.*\.)block_sparse_moe\.(experts\.\d+\.)(w1|w2|w3)(\..+)$", name)
    block = "block_sparse_moe" if naming == "mixed" else "mlp"
    if m:
        return f"{m.group(1)}{block}.{m.group(2)}{_HF_TO_PROJ[m.group(3)]}{m.group(4)}"
    if naming == "mlp":
        return name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
    return name


def to_transformers_name(name: str, arch: str) -> str:
    """Any of the namings above -> the one transformers loads for `arch`."""
    if arch != "mixtral":
        return name
    m = re.match(r"^(.*\.)(?:block_sparse_moe|mlp)\.(experts\.\d+\.)(gate_proj|up_proj|down_proj|w1|w2|w3)(\..+)$", name)
    if m:
        return f"{m.group(1)}block_sparse_moe.{m.group(2)}{_PROJ_TO_HF.get(m.group(3), m.group(3))}{m.group(4)}"
    return name.replace(".mlp.gate.", ".block_sparse_moe.gate.")


def _quantized(name: str, t: torch.Tensor) -> bool:
    mod = name[: -len(".weight")]
    return (name.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in name and mod != "lm_head"
            and not mod.endswith(".gate"))


def ct_quantize_checkpoint(src: Path, dst: Path, group_size: int, symmetric: bool, naming: str = "w",
                           keep: tuple[str, ...] = ()) -> Path:
    """A W4A16 `pack-quantized` copy of fp16 checkpoint `src`, written with compressed-tensors'
    own compressor. Router gates, lm_head and modules whose name contains an entry of `keep`
    stay plain and are listed in `ignore` (as llm-compressor writes them); Mixtral experts are
    renamed to `naming`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    src, dst = Path(src), Path(dst)
    _copy_side_files(src, dst)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    arch = json.loads((src / "config.json").read_text())["model_type"]
    out: dict[str, torch.Tensor] = {}
    ignore: list[str] = []
    for name, t in _read_all(src).items():
        new = rename_mixtral(name, naming) if arch == "mixtral" else name
        mod = new[: -len(".weight")]
        if not _quantized(name, t) or any(k in name for k in keep):
            out[new] = t
            if name.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in name:
                ignore.append(mod)
            continue
        grouped = t.reshape(t.shape[0], -1, group_size)  # the minmax observer, per group
        scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        state = {"weight": t, "weight_scale": scale, "weight_zero_point": zp.to(torch.int8)}
        for leaf, v in PackedQuantizationCompressor.compress(state, scheme).items():
            out[f"{mod}.{leaf}"] = v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized", ignore=sorted(ignore),
                            quantization_status=QuantizationStatus.COMPRESSED)
    ModelCompressor(quantization_config=qc).update_config(str(dst))
    return dst


def ct_dequantized_copy(src: Path, dst: Path) -> Path:
    """A plain fp32 copy of compressed-tensors checkpoint `src`, each quantized linear
    dequantized by the library's own `PackedQuantizationCompressor.decompress` (scales cast to
    fp32 first, so `(q - zp) * s` is exact), names as transformers loads them."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src, dst = Path(src), Path(dst)
    _copy_side_files(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg.pop("quantization_config"))
    (scheme,) = qc.config_groups.values()
    tensors = _read_all(src)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".weight_zero_point", ".weight_shape")):
            continue
        if name.endswith(".weight_packed"):
            mod = name[: -len(".weight_packed")]
            state = {"weight_packed": t, "weight_scale": tensors[mod + ".weight_scale"].float(),
                     "weight_shape": tensors[mod + ".weight_shape"]}
            if mod + ".weight_zero_point" in tensors:
                state["weight_zero_point"] = tensors[mod + ".weight_zero_point"]
            w = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
            assert w.dtype == torch.float32
            out[to_transformers_name(mod + ".weight", cfg["model_type"])] = w.contiguous()
        else:
            out[to_transformers_name(name, cfg["model_type"])] = t.float() if t.is_floating_point() else t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst
