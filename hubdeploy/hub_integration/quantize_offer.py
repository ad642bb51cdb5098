"""Quantize on deploy, the report's side: can this model be made AWQ 4-bit here, and should it?

`quantize_refusal(report)` says why quantizing cannot work (the report shows it, create
answers 422 with it); `quantize_offer(report, plans)` is what `/api/inspect` and the page
show: the AWQ memory plan per GPU beside the 16-bit one, which calibration text would be
used, and whether it is recommended (no AWQ variant on the Hub and the 16-bit weights do
not fit a GPU the AWQ checkpoint fits). The quantizer itself is `hubdeploy.quantize`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hubdeploy.hub_integration.memory_plan import MemoryPlan, awq_on_deploy_bytes, plan
from hubdeploy.serving.config import SUPPORTED_ARCHITECTURES

if TYPE_CHECKING:
    from hubdeploy.hub_integration.report import ModelReport

QUANTIZE_METHODS = ("awq",)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128


def calibration_label(calib: str | Path | None) -> str:
    """Which calibration text a quantization uses (the quantizer's name for it: the shipped set's
    name, or the file's name with its hash), for the report and the endpoint's events."""
    from hubdeploy.quantize.calibration import calibration_name

    return calibration_name(Path(calib) if calib else None)


def quantize_refusal(report: "ModelReport") -> str | None:
    """Why quantize-on-deploy cannot work for this model; None when it can."""
    q = report.quant
    if q.method != "none":
        what = f"{q.method.upper() if q.method in ('awq', 'gptq') else q.method}" + (f" {q.bits}-bit" if q.bits else "")
        served = q.method == "awq" and q.bits == 4
        return (f"{report.repo_id} is already quantized ({what}): " +
                ("deploy it as is, without quantize" if served else
                 "quantizing starts from 16-bit weights; deploy its unquantized base model with quantize"))
    arch = report.arch
    if not arch.family:  # the quantizer walks the layers of the families the engine serves
        return (f"architecture {arch.architecture or '(none)'} cannot be quantized on deploy (supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    w = report.weights
    if not w.has_safetensors:
        return "no safetensors weights to quantize (pickled/GGUF files are not read)"
    if not w.quantizable_params:
        return "no 16-bit decoder linear weights found in the safetensors files (missing files?)"
    return None


def _in_features(report: "ModelReport") -> dict[str, int]:
    """The input widths of the linears AWQ groups run along (each must be a multiple of the group size)."""
    a, m = report.arch, report.moe
    widths = {"hidden_size": a.hidden_size, "attention width (heads x head_dim)": a.num_attention_heads * a.head_dim}
    if m is not None:
        widths["expert intermediate size"] = m.expert_intermediate_size
        if m.shared_expert_intermediate_size:
            widths["shared expert intermediate size"] = m.shared_expert_intermediate_size
    if m is None or m.num_moe_layers < a.num_layers:
        widths["intermediate_size"] = a.intermediate_size
    return {k: v for k, v in widths.items() if v}


def group_sizes_that_fit(report: "ModelReport") -> list[int]:
    """The AWQ group sizes that divide every linear's input width, largest first."""
    widths = _in_features(report).values()
    return [g for g in sorted(GROUP_SIZES, reverse=True) if all(w % g == 0 for w in widths)]


def group_size_refusal(report: "ModelReport", group_size: int) -> str | None:
    """Why `group_size` cannot be used for this model (a width it does not divide); None when it can."""
    bad = [f"{k} {v}" for k, v in _in_features(report).items() if v % group_size]
    if not bad:
        return None
    fits = group_sizes_that_fit(report)
    return (f"group size {group_size} does not divide the {', '.join(bad)}; "
            + (f"use quantize_group_size {' or '.join(map(str, fits))}" if fits else "no AWQ group size fits"))


def quantize_offer(report: "ModelReport", plans16: Sequence[MemoryPlan], **plan_kw: Any) -> dict[str, Any]:
    """The AWQ-on-deploy option beside the 16-bit `plans16` (same GPUs, same `plan_kw`), at the
    largest group size (up to 128, AutoAWQ's default) the model's widths allow."""
    refusal = quantize_refusal(report)
    fits = group_sizes_that_fit(report)
    if refusal is None and not fits:
        refusal = group_size_refusal(report, DEFAULT_GROUP_SIZE)
    if refusal is not None:
        return {"available": False, "reason": refusal}
    group_size = fits[0]
    weights, decode = awq_on_deploy_bytes(report, group_size)
    awq = [plan(report, p.gpu, quantize="awq", quantize_group_size=group_size, **plan_kw) for p in plans16]
    recommended_for = [a.gpu for p, a in zip(plans16, awq) if a.fits and not p.fits]
    fitting = [a for a in awq if a.fits]
    return {
        "available": True, "method": "awq", "group_size": group_size, "w_bit": 4, "zero_point": True,
        "calibration": calibration_label(None), "weights_bytes": weights, "decode_bytes_per_token": decode,
        "recommended": bool(recommended_for) and not report.awq_variants,
        "recommended_for": recommended_for,
        "suggested_gpu": fitting[0].gpu if fitting else None,
        "plans": [a.to_dict() for a in awq],
        "reason": "no AWQ 4-bit variant is listed on the Hub" if not report.awq_variants else
                  f"an AWQ 4-bit variant exists: {report.awq_variants[0]} (no quantizing needed)",
    }
