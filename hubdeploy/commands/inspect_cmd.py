"""`hubdeploy inspect MODEL`: what a Hub model is, whether we can serve it, and on which GPU.

Reads metadata only (config, card, tokenizer config, safetensors headers); prints rich
tables or, with --json, the payload of the deploy service's `GET /api/inspect`.
Exit code 1 with a one-line reason for any inspection error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a model's facts, compatibility and GPU fit (metadata only)",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL", help="Hub repo id (org/name) or a local directory in Hub layout")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--gpu", default=None, help="plan for this GPU only (e.g. H100, A100-80GB, L4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--hub-endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN)")
    p.set_defaults(func=run)


def _scaled(n: float, unit: str) -> str:
    """1234567 -> '1.23 M' + unit: tiny test models and 46.7 B-parameter ones both read well."""
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def _gb(n: float | None) -> str:
    return "?" if n is None else _scaled(n, "B")


def _print_tables(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    r, plans = payload["report"], payload["plans"]
    a, q, w, moe = r["arch"], r["quant"], r["weights"], r["moe"]
    con = Console()
    facts = Table(title=f"{r['repo_id']} @ {(r['sha'] or r['revision'] or 'local')[:12]}", show_header=False)
    facts.add_column("field", style="bold")
    facts.add_column("value")
    card = r["card"]
    rows = [
        ("architecture", f"{a['architecture']} ({a['model_type']})"),
        ("layers / hidden", f"{a['num_layers']} / {a['hidden_size']}"),
        ("heads / KV heads / head dim", f"{a['num_attention_heads']} / {a['num_key_value_heads']} / {a['head_dim']}"),
        ("vocab / context", f"{a['vocab_size']} / {a['context_length']}"),
        ("rope", f"theta {a['rope_theta']:g}" + (f", scaling {a['rope_scaling']}" if a["rope_scaling"] else "")),
        ("parameters", _scaled(w["param_count"], "").replace("G", "B").strip()),
        ("weights", f"{_gb(w['total_bytes'])} in {len(w['files'])} file(s) (Hub: {_gb(w['file_bytes'])})"),
        ("license", str(card["license"])),
        ("base model", ", ".join(card["base_model"]) + (f" ({card['base_model_relation']})"
                                                        if card["base_model_relation"] else "") or "-"),
        ("gated / private", f"{r['gated'] or 'no'} / {'yes' if r['private'] else 'no'}"),
        ("tokenizer / chat template", f"{'yes' if r['has_tokenizer'] else 'no'} / "
                                      f"{'yes' if r['has_chat_template'] else 'no'}"),
    ]
    if moe:
        rows.insert(4, ("experts", f"{moe['num_experts']} (top-{moe['experts_per_token']}), "
                                   f"expert intermediate {moe['expert_intermediate_size']}"))
    for k, v in rows:
        facts.add_row(k, v)
    con.print(facts)

    qt = Table(title="Quantization")
    for col in ("method", "bits", "group", "zero point", "version", "source", "not converted"):
        qt.add_column(col)
    qt.add_row(q["method"], str(q["bits"] or "-"), str(q["group_size"] or "-"), str(q["zero_point"]),
               str(q["version"] or "-"), str(q["source"] or "-"), ", ".join(q["modules_to_not_convert"]) or "-")
    con.print(qt)

    ct = Table(title="Compatibility")
    for col in ("capability", "verdict", "reason", "what to do"):
        ct.add_column(col)
    style = {"ok": "green", "warn": "yellow", "error": "red"}
    for c in r["compat"]:
        ct.add_row(c["capability"], f"[{style[c['status']]}]{c['status']}[/]", c["reason"], c["action"] or "")
    con.print(ct)

    if r["adapters"]:
        at = Table(title="LoRA adapters on the Hub")
        for col in ("adapter", "rank", "alpha", "targets"):
            at.add_column(col)
        for ad in r["adapters"]:
            at.add_row(ad["repo_id"], str(ad["rank"]), str(ad["alpha"]), ", ".join(ad["target_modules"]))
        con.print(at)

    if r.get("lookups_unavailable"):
        nt = Table(title="Not looked up (optional Hub features; the report is complete without them)")
        for col in ("lookup", "why", "effect"):
            nt.add_column(col)
        for n in r["lookups_unavailable"]:
            nt.add_row(n["what"], n["why"], n["effect"])
        con.print(nt)

    gt = Table(title="GPUs (gpu_memory_utilization 0.9)")
    for col in ("GPU", "fit", "KV tokens", "max context", "concurrency", "est. tok/s (batch 1)", "reason"):
        gt.add_column(col)
    for p in plans:
        gt.add_row(p["gpu"], "[green]fits[/]" if p["fits"] else "[red]no fit[/]",
                   str(p["kv_tokens"]) if p["fits"] else "-", str(p["max_model_len"]) if p["fits"] else "-",
                   str(p["concurrency_at_max_len"]) if p["fits"] else "-", f"{p['decode_tok_s']:.0f}",
                   p["reason"])
    con.print(gt)
    q = payload.get("quantize") or {}
    if q.get("available"):
        fits = [p["gpu"] for p in q["plans"] if p["fits"]]
        con.print(f"quantize on deploy (quantize: awq, group {q['group_size']}, calibration {q['calibration']}): "
                  f"weights {_gb(q['weights_bytes'])}, fits {', '.join(fits) or 'no GPU'}"
                  + (f"; recommended for {', '.join(q['recommended_for'])}" if q.get("recommended") else ""),
                  soft_wrap=True)
    elif q:
        con.print(f"quantize on deploy: not available ({q['reason']})", soft_wrap=True)
    if payload.get("serve_args"):
        con.print(f"serve on {payload['suggested_gpu']}: hubdeploy serve {r['repo_id']} "
                  + " ".join(payload["serve_args"]), soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.utils import disable_progress_bars

    from hubdeploy.hub_integration.errors import InspectError
    from hubdeploy.hub_integration.inspect_api import inspect_payload

    disable_progress_bars()
    endpoint = args.hub_endpoint or os.environ.get("HF_ENDPOINT") or None
    token = args.token or os.environ.get("HF_TOKEN") or None
    try:
        payload = inspect_payload(args.model, args.revision, token=token, endpoint=endpoint,
                                  gpus=[args.gpu] if args.gpu else None)
    except InspectError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        _print_tables(payload)
    return 0
