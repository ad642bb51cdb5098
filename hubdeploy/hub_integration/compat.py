"""Can our engine serve this model? One verdict per capability, each with what to do.

Statuses: "error" (cannot be served as is), "warn" (served with a limitation), "ok".
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from hubdeploy.hub_integration.gpus import catalog
from hubdeploy.serving.compressed_tensors import SERVED_FORMAT
from hubdeploy.serving.config import SUPPORTED_ARCHITECTURES

if TYPE_CHECKING:
    from hubdeploy.hub_integration.report import CompatItem, ModelReport

SERVED_AWQ_VERSIONS = ("gemm", "gemv")


def _suggest(report: "ModelReport") -> str:
    from hubdeploy.hub_integration.report import AWQ_VARIANT_SEARCH

    if report.awq_variants:
        return "use an AWQ 4-bit variant listed on the Hub: " + ", ".join(report.awq_variants)
    base = report.card.base_model[0] if report.card.base_model else report.repo_id
    quantize = "quantize it with AutoAWQ (w_bit=4, q_group_size=128, version='GEMM') and upload the result"
    if report.unavailable(AWQ_VARIANT_SEARCH):
        return (f"AWQ 4-bit variants of {base} could not be looked up (this Hub has no model search): "
                f"look for one on the base model's page, or {quantize}")
    return f"no AWQ 4-bit variant of {base} is listed on the Hub; {quantize}"


def quant_verdict(report: "ModelReport") -> "CompatItem":
    from hubdeploy.hub_integration.report import CompatItem

    q = report.quant
    if q.method == "none":
        return CompatItem("quantization", "ok", f"unquantized {report.arch.torch_dtype} weights")
    if q.method == "awq":
        version = q.version or "gemm"
        if q.bits != 4:
            return CompatItem("quantization", "error",
                              f"AWQ {q.bits}-bit is not served: the engine's kernels are 4-bit only",
                              _suggest(report))
        if version not in SERVED_AWQ_VERSIONS:
            return CompatItem("quantization", "error",
                              f"AWQ version {version!r} is not served (GEMM/GEMV packing only)", _suggest(report))
        return CompatItem("quantization", "ok",
                          f"AWQ 4-bit, group {q.group_size}, {version.upper()} (from {q.source})")
    if q.method == "compressed-tensors":
        if q.not_served:
            return CompatItem("quantization", "error", q.not_served, _suggest(report))
        sym = "symmetric" if not q.zero_point else "asymmetric"
        return CompatItem("quantization", "ok",
                          f"compressed-tensors W4A16 {sym}, group {q.group_size} ({SERVED_FORMAT}, llm-compressor; "
                          f"repacked for the AWQ kernels at load, from {q.source})")
    names = {"gptq": "GPTQ", "bitsandbytes": "bitsandbytes", "gguf": "GGUF", "fp8": "FP8"}
    name = names.get(q.method, q.method)
    return CompatItem("quantization", "error",
                      f"{name}{f' {q.bits}-bit' if q.bits else ''} is not served: the engine runs AWQ 4-bit "
                      "(GEMM/GEMV), compressed-tensors W4A16 and unquantized fp16/bf16 weights only", _suggest(report))


def check_compat(report: "ModelReport", token_given: bool = False) -> list["CompatItem"]:
    """All verdicts, errors first in the order a user would fix them."""
    from hubdeploy.hub_integration.report import ADAPTER_SEARCH, CompatItem

    out: list[CompatItem] = []
    a = report.arch
    if a.architecture in SUPPORTED_ARCHITECTURES:
        out.append(CompatItem("architecture", "ok", f"{a.architecture} is supported"))
    elif a.remote_code_only:
        out.append(CompatItem("architecture", "error",
                              f"{a.architecture or 'this model'} needs trust_remote_code (custom code in the "
                              "repo), which the engine never runs",
                              "pick a repo of a supported architecture: " + ", ".join(SUPPORTED_ARCHITECTURES)))
    else:
        out.append(CompatItem("architecture", "error",
                              f"architecture {a.architecture or '(none in config.json)'} is not supported",
                              "supported: " + ", ".join(SUPPORTED_ARCHITECTURES)))
    out.append(quant_verdict(report))
    w = report.weights
    if not w.has_safetensors:
        extra = f" (found {', '.join(w.other_weight_files[:3])})" if w.other_weight_files else ""
        out.append(CompatItem("weights", "error", f"no safetensors weights{extra}; pickled/GGUF files are not loaded",
                              "convert the checkpoint to safetensors or pick a repo that has them"))
    elif w.sizes_consistent is False:
        out.append(CompatItem("weights", "error",
                              "safetensors headers disagree with the file sizes on the Hub (truncated upload?)",
                              "re-upload the weights"))
    else:
        out.append(CompatItem("weights", "ok", f"{len(w.files)} safetensors file(s), {w.num_tensors} tensors"))
    biggest = max(g.memory_bytes for g in catalog() if g.memory_gb <= 80)
    if w.total_bytes > 0.9 * biggest:
        out.append(CompatItem("size", "warn", f"{w.total_bytes / 1e9:.1f} GB of weights do not fit one 80 GB GPU "
                              "(H100 / A100-80GB); only larger GPUs (H200, B200) can serve it",
                              _suggest(report)))
    if not report.has_tokenizer:
        out.append(CompatItem("tokenizer", "error", "no tokenizer.json / tokenizer.model in the repo",
                              "add the tokenizer files of the base model to the repo"))
    elif not report.has_chat_template:
        out.append(CompatItem("chat", "warn",
                              "no chat template: /v1/chat/completions is unavailable, /v1/completions only",
                              "add a chat_template to tokenizer_config.json (or chat_template.jinja)"))
    else:
        out.append(CompatItem("chat", "ok", "chat template present"))
    if report.gated:
        if token_given:
            out.append(CompatItem("access", "warn", f"gated repo ({report.gated}); your token can read it",
                                  "the endpoint needs an HF token with access as a secret"))
        else:
            out.append(CompatItem("access", "error", "gated repo and no token given",
                                  "accept the conditions on the model page and pass --token / HF_TOKEN"))
    bad = [ad for ad in report.adapters if ad.error or ad.use_dora]
    if report.adapters:
        status = "warn" if bad else "ok"
        reason = f"{len(report.adapters)} LoRA adapter(s) found on the Hub"
        if bad:
            reason += "; not loadable: " + ", ".join(
                f"{ad.repo_id} ({'DoRA' if ad.use_dora else ad.error})" for ad in bad)
        out.append(CompatItem("adapters", status, reason))
    elif (search := report.unavailable(ADAPTER_SEARCH)) is not None:
        out.append(CompatItem("adapters", "warn", f"LoRA adapters of this model could not be listed: {search.why}",
                              "name the adapters to serve yourself (name=org/repo)"))
    order = {"error": 0, "warn": 1, "ok": 2}
    return sorted(out, key=lambda c: order[c.status])
