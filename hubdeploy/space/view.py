"""Pure formatting for the page: the service's JSON in, escaped HTML and choice lists out.

Nothing here calls the network, so every piece can be checked on its own. All values that
come from a card, the Hub or the service are escaped with `html.escape`.
"""
from __future__ import annotations

import re
import time
from html import escape
from typing import Any
from urllib.parse import urlencode

from hubdeploy.hub_integration.spec import ADAPTER_NAME_PATTERN, NAME_PATTERN
from hubdeploy.space.hub import CardView

CPU = "cpu"
PHASES = (("pending", "Queued"), ("downloading", "Downloading"), ("quantizing", "Quantizing"), ("loading", "Loading"),
          ("warming_up", "Warming up"), ("running", "Running"))


def gb(n: float | int | None) -> str:
    """Bytes for people: GB with the precision that matters, MB/KB for tiny models."""
    if not n:
        return "0 GB"
    if n < 1e6:
        return f"{n / 1e3:.0f} KB"
    if n < 1e9:
        return f"{n / 1e6:.0f} MB" if n >= 1e7 else f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.2f} GB" if n < 10e9 else f"{n / 1e9:.1f} GB"


def _num(n: int | float | None) -> str:
    if n is None:
        return "—"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def e(x: Any) -> str:
    return escape(str(x), quote=True)


def deploy_href(model: str, **extra: str | None) -> str:
    """A link that reloads the page prefilled with `model` (suggested alternatives, badge preview)."""
    q = {"model": model, **{k: v for k, v in extra.items() if v}}
    return "/deploy?" + urlencode(q, safe="/,:")


def notice(kind: str, title: str, body: str = "", hint: str = "") -> str:
    """A coloured box: kind is ok | warn | error | info."""
    parts = [f'<div class="hd-notice hd-{e(kind)}"><strong>{e(title)}</strong>']
    if body:
        parts.append(f"<div>{e(body)}</div>")
    if hint:
        parts.append(f'<div class="hd-hint">What to do: {e(hint)}</div>')
    parts.append("</div>")
    return "".join(parts)


# -- model ---------------------------------------------------------------------------------
def card_summary_html(card: CardView, report: dict[str, Any]) -> str:
    chips = []
    if card.license:
        chips.append(f'<span class="hd-chip hd-chip-license">⚖️ {e(card.license)}</span>')
    if card.pipeline_tag:
        chips.append(f'<span class="hd-chip">{e(card.pipeline_tag)}</span>')
    seen = {card.pipeline_tag, card.license}
    for t in card.tags[:16]:
        if t not in seen and not t.startswith(("base_model:", "license:", "region:")):
            seen.add(t)
            chips.append(f'<span class="hd-chip">{e(t)}</span>')
    meta = []
    if card.base_model:
        meta.append("base model " + ", ".join(f"<code>{e(b)}</code>" for b in card.base_model))
    if card.downloads is not None:
        meta.append(f"{_num(card.downloads)} downloads")
    if card.likes:
        meta.append(f"{_num(card.likes)} likes")
    if report.get("sha"):
        meta.append(f"revision <code>{e(report.get('revision') or 'main')}</code> @ <code>{e(report['sha'][:10])}</code>")
    title = e(card.title)
    if card.url:
        title = f'<a href="{e(card.url)}" target="_blank" rel="noopener">{title}</a>'
    return (f'<div class="hd-card-summary"><div class="hd-title">{title}</div>'
            f'<div class="hd-repo"><code>{e(report.get("repo_id", ""))}</code></div>'
            f'<div class="hd-chips">{"".join(chips)}</div>'
            f'<div class="hd-meta">{" · ".join(meta)}</div></div>')


def facts_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The ModelReport as (fact, value) rows, most telling first."""
    a, q, w, moe = report["arch"], report["quant"], report["weights"], report.get("moe")
    rows = [("Architecture", f"{a['architecture']} ({a.get('family') or 'not served'})"),
            ("Layers · hidden · heads (KV)", f"{a['num_layers']} · {a['hidden_size']} · "
                                             f"{a['num_attention_heads']} ({a['num_key_value_heads']})")]
    if moe:
        rows.append(("Experts", f"{moe['num_experts']} experts, {moe['experts_per_token']} active per token, "
                                f"expert width {moe['expert_intermediate_size']}"))
    if q["method"] == "none":
        rows.append(("Weights", f"unquantized ({a.get('torch_dtype') or 'unknown dtype'})"))
    else:
        desc = f"{q['method'].upper()} {q.get('bits') or '?'}-bit"
        if q.get("group_size"):
            desc += f", group size {q['group_size']}"
        if q.get("version"):
            desc += f", {q['version']}"
        if q.get("zero_point"):
            desc += ", zero point"
        rows.append(("Quantization", desc))
    rows.append(("Parameters", _num(w.get("param_count"))))
    size = gb(w.get("total_bytes"))
    if moe and w.get("active_bytes_per_token"):
        size += f" ({gb(w['active_bytes_per_token'])} read per token)"
    rows.append(("Weights size", size))
    rows.append(("Context length", f"{a['context_length']:,} tokens"))
    rows.append(("Tokenizer · chat template", f"{'yes' if report['has_tokenizer'] else 'missing'} · "
                                              f"{'yes' if report['has_chat_template'] else 'none'}"))
    ads = report.get("adapters") or []
    rows.append(("LoRA adapters found", ", ".join(x["repo_id"].rstrip("/").split("/")[-1] for x in ads) or "none"))
    if report.get("gated"):
        rows.append(("Access", "gated: needs a Hugging Face token with access"))
    return rows


def facts_html(report: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts_rows(report))
    return f'<table class="hd-facts">{body}</table>'


def verdict_html(report: dict[str, Any], plans: list[dict[str, Any]], suggested: str | None) -> str:
    """Servable or not, each compatibility item with its reason, and clickable alternatives."""
    compat = report.get("compat") or []
    errors = [c for c in compat if c["status"] == "error"]
    warns = [c for c in compat if c["status"] == "warn"]
    if errors:
        head = '<div class="hd-verdict hd-error">✗ This model cannot be served as it is</div>'
    elif suggested:
        head = f'<div class="hd-verdict hd-ok">✓ Ready to deploy — fits {e(suggested)} and larger GPUs</div>'
    else:
        head = '<div class="hd-verdict hd-warn">! Servable, but it fits no single GPU of the catalog</div>'
    items = []
    for c in errors + warns + [c for c in compat if c["status"] == "ok"]:
        icon = {"error": "✗", "warn": "!", "ok": "✓"}[c["status"]]
        action = f' <span class="hd-hint">→ {e(c["action"])}</span>' if c.get("action") else ""
        items.append(f'<li class="hd-{e(c["status"])}"><b>{icon} {e(c["capability"])}</b>: {e(c["reason"])}{action}</li>')
    alts = report.get("awq_variants") or []
    alt_html = ""
    if alts:
        links = " ".join(f'<a class="hd-alt" href="{e(deploy_href(a))}">{e(a)}</a>' for a in alts[:6])
        alt_html = f'<div class="hd-alts">Try instead: {links}</div>'
    return f'{head}<ul class="hd-compat">{"".join(items)}</ul>{alt_html}'


# -- hardware ------------------------------------------------------------------------------
def gpu_choices(plans: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) for the hardware radio: fit or not, memory, context, concurrency, speed."""
    out = []
    for p in plans:
        total = p["gpu_memory_bytes"]
        if p["fits"]:
            used = p["weights_bytes"] + p["overhead_bytes"]
            label = (f"✓ {p['gpu']} — {gb(used)} of {gb(total)} for weights · ctx {p['max_model_len']:,} · "
                     f"{p['max_num_seqs']} seqs · ~{_num(p['decode_tok_s'])} tok/s")
        else:
            label = f"✗ {p['gpu']} ({gb(total)}) — does not fit"
        out.append((label, p["gpu"]))
    out.append(("⚙ cpu — this machine's CPU: slow, for tiny models and trying things out", CPU))
    return out


def quantize_html(offer: dict[str, Any] | None, report: dict[str, Any] | None = None) -> str:
    """The quantize-on-deploy option under the hardware list: what it makes, with which calibration
    text, where it is recommended; or why it cannot be done for this model."""
    if not offer:
        return ""
    if not offer.get("available"):
        return notice("info", "Quantize on deploy: not available", offer.get("reason") or "")
    w16 = ((report or {}).get("weights") or {}).get("total_bytes")
    size = f"{gb(offer['weights_bytes'])} of weights" + (f" instead of {gb(w16)}" if w16 else "")
    where = (f" Recommended: the 16-bit weights do not fit {', '.join(offer['recommended_for'])}, the AWQ ones do."
             if offer.get("recommended") else "")
    return notice("ok" if offer.get("recommended") else "info", "Quantize to AWQ 4-bit on deploy",
                  f"{size} (4-bit, group {offer['group_size']}, router gates and lm_head kept 16-bit), calibrated "
                  f"on {offer['calibration']}; made once per model revision and reused by later deploys. "
                  f"{offer.get('reason', '')}.{where}")


def plans_for(payload: dict[str, Any] | None, quantize: bool | None) -> list[dict[str, Any]]:
    """The memory plans to show: the AWQ-on-deploy ones when quantizing is chosen (and offered)."""
    payload = payload or {}
    offer = payload.get("quantize") or {}
    return offer.get("plans") or [] if quantize and offer.get("available") else payload.get("plans") or []


def plan_html(plan: dict[str, Any] | None, gpu: str | None) -> str:
    """Where the memory goes on the chosen GPU, as a stacked bar and a sentence."""
    if gpu == CPU or plan is None:
        return notice("info", "CPU target", "No memory plan on the CPU: the engine sizes its KV cache from "
                      "free RAM. Expect a few tokens per second for real models; tiny models are fast.")
    if not plan["fits"]:
        return notice("error", f"Does not fit {plan['gpu']}", plan["reason"], "Pick a GPU marked ✓, or an AWQ 4-bit variant.")
    total = plan["gpu_memory_bytes"]
    parts = [("weights", plan["weights_bytes"]), ("runtime", plan["overhead_bytes"]), ("KV cache", plan["kv_cache_bytes"])]
    bar = "".join(f'<span class="hd-seg hd-seg-{i}" style="width:{100 * v / total:.1f}%" title="{e(n)} {gb(v)}"></span>'
                  for i, (n, v) in enumerate(parts))
    legend = " · ".join(f'<span class="hd-dot hd-seg-{i}"></span>{e(n)} {gb(v)}' for i, (n, v) in enumerate(parts))
    return (f'<div class="hd-plan"><div class="hd-bar">{bar}</div><div class="hd-legend">{legend} · '
            f'free {gb(total - sum(v for _, v in parts))} of {gb(total)}</div>'
            f'<div class="hd-plan-facts">max context <b>{plan["max_model_len"]:,}</b> tokens · '
            f'<b>{plan["concurrency_at_max_len"]}</b> sequences at full context '
            f'(<b>{plan["max_num_seqs"]}</b> decoded at once) · <b>{plan["kv_tokens"]:,}</b> KV tokens · '
            f'est. <b>{_num(plan["decode_tok_s"])}</b> tok/s at batch 1'
            + (" · weights as AWQ 4-bit, quantized on deploy" if plan.get("quantize") else "") + '</div></div>')


# -- options -------------------------------------------------------------------------------
def suggest_name(model: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """A DNS-safe endpoint name from the model id, unique among `taken`."""
    base = re.sub(r"[^a-z0-9]+", "-", model.rstrip("/").split("/")[-1].lower()).strip("-")[:26].strip("-") or "endpoint"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    assert re.match(NAME_PATTERN, name), name
    return name


def adapter_name(src: str) -> str:
    """The served name of an adapter (what clients put in `model`), from its repo id or folder."""
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", src.rstrip("/").split("/")[-1]).strip("-.") or "adapter"
    return name[:64] if re.match(ADAPTER_NAME_PATTERN, name) else f"a-{name}"[:64]


def parse_adapters(checked: list[str] | None, extra: str | None) -> dict[str, str]:
    """Checked adapters + free entries (`name=org/repo` or `org/repo`, comma or newline separated)."""
    out: dict[str, str] = {}
    items = [(None, c) for c in (checked or [])]
    for raw in re.split(r"[,\n]", extra or ""):
        raw = raw.strip()
        if raw:
            n, _, src = raw.partition("=") if "=" in raw else (None, "", raw)
            items.append((n.strip() if n else None, src.strip()))
    for n, src in items:
        if not src or src in out.values():
            continue
        name = n or adapter_name(src)
        if name in out:
            raise ValueError(f"two adapters would be served as {name!r}; name one explicitly as name=org/repo")
        out[name] = src
    return out


# -- deploy progress -----------------------------------------------------------------------
def progress_html(ep: dict[str, Any], hint: str = "") -> str:
    """Phase steps and a bar for an endpoint as `GET /api/endpoints/{name}` shows it."""
    status, phase = ep["status"], ep.get("phase")
    if status == "failed":
        return notice("error", f"{ep['name']} failed", ep.get("reason") or "no reason given",
                      hint or "Read the log tail below; fix the option it names and deploy again, "
                              "or press Resume in My endpoints to retry.")
    current = "running" if status == "running" else (phase if status == "initializing" and phase else "pending")
    if status in ("paused", "scaled_to_zero"):
        current = "pending"
    quantize = bool((ep.get("spec") or {}).get("quantize")) or current == "quantizing"
    phases = [(k, label) for k, label in PHASES if k != "quantizing" or quantize]
    keys = [k for k, _ in phases]
    idx = keys.index(current) if current in keys else 0
    prog = ep.get("progress") or {}
    done, total = prog.get("bytes_done") or 0, prog.get("bytes_total") or 0
    frac = {"pending": 0.03, "loading": 0.8, "warming_up": 0.92, "running": 1.0}.get(current, 0.05)
    detail = {"pending": "waiting for a device slot", "loading": "loading weights into memory",
              "warming_up": "compiling and warming up the engine", "running": "ready: answering requests"}
    if current == "downloading":
        f = done / total if total else 0.0
        frac = 0.05 + 0.7 * f
        text = f"downloading {gb(done)} of {gb(total)} ({f:.0%})" if total else "downloading (size not known yet)"
        if quantize:
            frac = 0.05 + 0.25 * f
    elif current == "quantizing":
        layers, of = prog.get("layers_done") or 0, prog.get("layers_total") or 0
        f = layers / of if of else 0.0
        frac = 0.3 + 0.45 * f
        text = (f"quantizing to AWQ 4-bit: layer {layers} of {of}, {gb(done)} written" if of
                else "quantizing to AWQ 4-bit: calibrating")
    else:
        text = detail.get(current, current)
    if status == "paused":
        text = "paused"
    elif status == "scaled_to_zero":
        text = "scaled to zero (idle): the next request, or Resume, wakes it"
    steps = "".join(
        f'<li class="{"hd-done" if i < idx or current == "running" else "hd-now" if i == idx else ""}">{e(label)}</li>'
        for i, (_, label) in enumerate(phases))
    return (f'<div class="hd-progress" data-status="{e(status)}" data-phase="{e(current)}">'
            f'<ol class="hd-steps">{steps}</ol>'
            f'<div class="hd-bar"><span class="hd-fill" style="width:{100 * frac:.0f}%"></span></div>'
            f'<div class="hd-progress-text"><b>{e(ep["name"])}</b>: {e(text)}</div></div>')


def age(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "—"
    s = max(0, int((now or time.time()) - ts))
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s // n} {unit}"
    return f"{s} s"


ENDPOINT_COLUMNS = ["name", "status", "model", "GPU", "URL", "scale to zero", "age"]


def scale_to_zero_text(spec: dict[str, Any], short: bool = False) -> str:
    """The endpoint's `scale_to_zero_after_s` in words (the panel's and the table's)."""
    after = int(spec.get("scale_to_zero_after_s") or 0)
    if after <= 0:
        return "off" if short else "off: the endpoint keeps its device until paused or deleted"
    if short:
        return f"after {after} s idle"
    return (f"after {after} s without a request; the next request wakes it "
            "(send X-Scale-Up-Timeout to wait for it instead of a 503)")


def endpoint_rows(endpoints: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for ep in endpoints:
        status = ep["status"] + (f" ({ep['phase']})" if ep["status"] == "initializing" and ep.get("phase") else "")
        rows.append([ep["name"], status, ep["spec"]["model"], ep.get("device") or ep["spec"]["gpu"],
                     ep.get("url") or "", scale_to_zero_text(ep["spec"], short=True), age(ep.get("created_at"))])
    return rows
