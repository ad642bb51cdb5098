"""llm-compressor's checkpoints (`quant_method: compressed-tensors`): which ones we serve.

We serve exactly W4A16 in the `pack-quantized` format: 4-bit integer weights in groups along
the input dimension, symmetric or asymmetric, activations unquantized. `parse_w4a16` reads a
`quantization_config` and either returns that scheme or raises `ConfigError` naming the field
that makes it something else (activation quantization, 8-bit, group activation ordering,
sparsity, transforms, a quantized KV cache, another format), so the deploy side's verdict and
the engine's refusal are the same sentence. No torch here: `hub_integration` imports it.

What the tensors look like (per quantized linear `name`, weight `[out, in]`, group `g`), and
how `kernels.compressed_tensors` turns them into our AWQ kernel layout, is written down there.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hubdeploy.serving.config import ConfigError

METHODS = ("compressed-tensors", "compressed_tensors")
SERVED_FORMAT = "pack-quantized"
# `actorder` values that leave the stored format unchanged ("static" is the library's alias of
# "weight": the order only steers GPTQ's calibration; no g_idx is written). "group"/"dynamic"
# (and the legacy `true`) permute the groups and store `weight_g_idx`: refused.
FORMAT_NEUTRAL_ACTORDER = (None, False, "weight", "static")


@dataclass(frozen=True)
class W4A16Scheme:
    """The one weight scheme of a served compressed-tensors checkpoint."""

    group_size: int
    symmetric: bool
    ignore: tuple[str, ...] = ()

    def ignored(self, module: str) -> bool:
        """Is HF module `module` in the config's `ignore` list? Entries are exact names or
        `re:<pattern>` (matched at the start, as compressed-tensors' own `match_name` does)."""
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.match(entry[3:], module):
                    return True
            elif entry == module:
                return True
        return False


def is_compressed_tensors(method: str | None) -> bool:
    return (method or "").lower() in METHODS


def _refuse(field: str, value: Any, what: str) -> ConfigError:
    return ConfigError(
        f"compressed-tensors quantization_config.{field} = {value!r}: {what}; only W4A16 "
        f"({SERVED_FORMAT}: int 4-bit weights in groups, unquantized activations) is served."
    )


def _formats(raw: Mapping[str, Any], groups: Mapping[str, Any]) -> list[tuple[str, Any]]:
    top = raw.get("format")
    if top and top != "mixed-precision":
        return [("format", top)]
    per_group = [(f"config_groups.{k}.format", g.get("format")) for k, g in groups.items() if isinstance(g, Mapping)]
    return [(f, v) for f, v in per_group if v is not None] or [("format", top)]


def parse_w4a16(raw: Mapping[str, Any]) -> W4A16Scheme:
    """The W4A16 scheme of a compressed-tensors `quantization_config`, or `ConfigError` naming
    the first field that is not W4A16 `pack-quantized` (the message says what it is instead)."""
    groups = raw.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise _refuse("config_groups", groups, "no quantization scheme is declared")
    for field, fmt in _formats(raw, groups):
        if fmt != SERVED_FORMAT:
            raise _refuse(field, fmt, f"the {fmt or 'missing'} format is not read (weights must be packed int4)")
    status = raw.get("quantization_status")
    if status not in (None, "compressed"):
        raise _refuse("quantization_status", status, "the weights are not stored compressed")
    sparsity = raw.get("sparsity_config") or {}
    if sparsity and (not isinstance(sparsity, Mapping) or sparsity.get("format") not in (None, "dense")):
        raise _refuse("sparsity_config", sparsity, "sparse (e.g. 2:4) weights are not served")
    if raw.get("transform_config"):
        raise _refuse("transform_config", raw["transform_config"],
                      "rotated weights (QuIP / SpinQuant transforms) are not served")
    if raw.get("kv_cache_scheme") is not None:
        raise _refuse("kv_cache_scheme", raw["kv_cache_scheme"], "a quantized KV cache is not served")
    schemes: set[tuple[int, bool]] = set()
    for name, g in groups.items():
        at = f"config_groups.{name}"
        if not isinstance(g, Mapping):
            raise _refuse(at, g, "not a scheme")
        for act in ("input_activations", "output_activations"):
            if g.get(act) is not None:
                raise _refuse(f"{at}.{act}", g[act], "activation quantization (W8A8, W4A8, FP8, ...) is not served")
        w = g.get("weights")
        if not isinstance(w, Mapping):
            raise _refuse(f"{at}.weights", w, "no weight quantization is declared")
        checks = [
            ("type", w.get("type", "int"), w.get("type", "int") == "int", "float weights (FP8 / NVFP4 / MXFP4) are not served"),
            ("num_bits", w.get("num_bits"), w.get("num_bits") == 4, "only 4-bit weights are served"),
            ("strategy", w.get("strategy"), w.get("strategy") == "group",
             "only per-group scales along the input dimension are served"),
            ("actorder", w.get("actorder"), w.get("actorder") in FORMAT_NEUTRAL_ACTORDER,
             "group activation ordering (weight_g_idx) is not served; 'weight'/'static' or null is"),
            ("dynamic", w.get("dynamic"), not w.get("dynamic"), "dynamic weight quantization is not served"),
            ("block_structure", w.get("block_structure"), w.get("block_structure") is None,
             "block-wise scales are not served"),
        ]
        for field, value, ok, what in checks:
            if not ok:
                raise _refuse(f"{at}.weights.{field}", value, what)
        gs = w.get("group_size")
        if not isinstance(gs, int) or gs <= 0 or gs % 8:
            raise _refuse(f"{at}.weights.group_size", gs, "the kernels need a positive multiple of 8")
        schemes.add((gs, bool(w.get("symmetric", True))))
    if len(schemes) > 1:
        raise _refuse("config_groups", sorted(schemes),
                      "layers with different group sizes or symmetry in one model are not served")
    (group_size, symmetric), = schemes
    ignore = raw.get("ignore") or []
    return W4A16Scheme(group_size, symmetric, tuple(str(i) for i in ignore))


__all__ = ["FORMAT_NEUTRAL_ACTORDER", "SERVED_FORMAT", "W4A16Scheme", "is_compressed_tensors", "parse_w4a16"]
