"""The deploy page (`gr.Blocks`): model → hardware → options → deploy → result, and My endpoints.

Every action goes through the deploy service's REST API (`space.client.ServiceClient`), so
the same page runs mounted inside `hubdeploy up` (it calls its own server over loopback)
and standalone on a Hugging Face Space (it calls `HUBDEPLOY_URL` with `HUBDEPLOY_TOKEN`).
Query parameters `model, revision, adapters, gpu` (the badge's `/deploy?…` link) prefill
the form through a `demo.load` handler; Connect and a sign-in link (`/#token=…`) run the same
path, so a first visit never needs a reload. Event handlers carry `api_name`s, so `gradio_client`
can drive the same flow: `/inspect`, `/deploy`, `/chat`, `/endpoints`, `/pause`, `/resume`,
`/delete`, `/logs`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from hubdeploy.hub_integration.badge import badge_html, badge_markdown
from hubdeploy.hub_integration.gpus import catalog
from hubdeploy.space import view
from hubdeploy.space.client import TOKEN_ENV, URL_ENV, ServiceClient, ServiceError, stream_chat
from hubdeploy.space.hub import card_view, search_models
from hubdeploy.space.snippets import render_snippets

CSS_PATH = Path(__file__).with_name("style.css")
MAX_LOG_LINES = 60


@dataclass
class PageConfig:
    """Where the page finds its service and the Hub. None means: take it from the environment."""

    service_url: str | None = None  # else $HUBDEPLOY_URL, else the server this page is mounted in
    token: str | None = None  # else $HUBDEPLOY_TOKEN, else the "Service access" box
    hub_endpoint: str | None = None  # else $HF_ENDPOINT, else huggingface.co
    badge_url: str | None = None  # public URL for badges; else the page's own URL
    on_space: bool | None = None  # else: running on a Space ($SYSTEM=spaces, as Gradio decides)
    read_local_cards: bool = True  # show README.md of local model folders (mounted use)
    poll_interval: float = 1.0
    deploy_timeout: float = 1800.0

    def resolved(self) -> "PageConfig":
        return PageConfig(
            service_url=self.service_url or os.environ.get(URL_ENV) or None,
            token=self.token or os.environ.get(TOKEN_ENV) or None,
            hub_endpoint=self.hub_endpoint or os.environ.get("HF_ENDPOINT") or None,
            badge_url=self.badge_url or os.environ.get("HUBDEPLOY_PUBLIC_URL") or None,
            on_space=(os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("SPACE_ID")))
            if self.on_space is None else self.on_space,
            read_local_cards=self.read_local_cards, poll_interval=self.poll_interval,
            deploy_timeout=self.deploy_timeout)


def _own_url(request: gr.Request | None) -> str:
    """The address of the server this page runs in, as the server itself can reach it."""
    req = getattr(request, "request", None) if request is not None else None
    if req is not None:
        server = req.scope.get("server")
        if server and server[1]:
            host = server[0] if server[0] not in ("0.0.0.0", "::") else "127.0.0.1"
            host = f"[{host}]" if ":" in host else host
            return f"{req.url.scheme}://{host}:{server[1]}"
        return str(req.base_url).rstrip("/")
    headers = dict(getattr(request, "headers", {}) or {})
    if headers.get("host"):
        return f"http://{headers['host']}"
    raise ServiceError(503, f"the page does not know where the deploy service is: set {URL_ENV}")


def _public_url(cfg: PageConfig, request: gr.Request | None) -> str:
    """The URL people reach this page at (for badges): configured, else what the browser used."""
    if cfg.badge_url:
        return cfg.badge_url.rstrip("/")
    headers = dict(getattr(request, "headers", {}) or {}) if request is not None else {}
    host = headers.get("x-forwarded-host") or headers.get("host")
    if host:
        return f"{headers.get('x-forwarded-proto', 'http')}://{host}"
    return cfg.service_url or "http://127.0.0.1:7860"


def _err_html(e: Exception) -> str:
    if isinstance(e, ServiceError):
        title = f"The deploy service refused ({e.status})" if e.status < 500 else f"Service problem ({e.status})"
        return view.notice("error", title, e.message, e.hint)
    return view.notice("error", "Unexpected error", f"{type(e).__name__}: {e}",
                       "Try again; if it persists, read the service log.")


def _text(content: Any) -> str:
    """A chat message's text: Gradio 6 may hand history back as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(p) for p in content)
    return "" if content is None else str(content)


def _int_or_none(x: Any) -> int | None:
    """A number field's value; empty or 0 means 'let the memory plan decide' (None in the spec)."""
    if x in (None, "") or (isinstance(x, float) and x != x) or int(x) == 0:
        return None
    return int(x)


NUMBER_PARAMS = ("max_model_len", "max_num_seqs", "max_loras")
PREFILL_PARAMS = ("model", "revision", "gpu", "adapters", "name", "access")

# A sign-in link (`http://host:port/#token=…`, printed by `hubdeploy up`) carries the admin token in
# the fragment, which browsers never send, so it stays out of server and proxy logs. This runs in the
# browser before the page-load handler: it hands that handler the token (saved there as Connect saves
# a pasted one) and takes it out of the address bar, so it is neither in history nor copied onward.
READ_SIGN_IN_JS = """(saved, hfToken, box) => {
  const token = new URLSearchParams(window.location.hash.slice(1)).get("token");
  if (token !== null) {
    window.history.replaceState(window.history.state, "", window.location.pathname + window.location.search);
  }
  return [saved, hfToken, token || ""];
}"""


def query_prefill(query: dict[str, str]) -> dict[str, Any]:
    """What the badge's `/deploy?model=…&gpu=…` asks the form to show (numbers only when they are)."""
    pre: dict[str, Any] = {k: query[k].strip() for k in PREFILL_PARAMS if (query.get(k) or "").strip()}
    pre.update({k: int(query[k]) for k in NUMBER_PARAMS if (query.get(k) or "").isdigit() and int(query[k])})
    return pre


class _Page:
    """What every section shares: the configuration, the visitor's state (made inside the page's
    `gr.Blocks`, before any section) and a service client per request."""

    def __init__(self, cfg: PageConfig) -> None:
        self.cfg = cfg
        self.server_token = cfg.token
        self.prefill = gr.State({})  # what the badge's query (or Connect) asked the form to show
        self.report_state = gr.State(None)  # the last inspect payload (report and plans)
        self.endpoint_state = gr.State(None)  # the endpoint just deployed, for the playground
        self.saved_token = gr.BrowserState("", storage_key="hubdeploy-service-token")
        # The visitor's Hugging Face token: a State filled by OAuth on a Space (`_Access`), else
        # the Options section's textbox. Set by whichever section builds it.
        self.hf_token: gr.components.Component | None = None

    def client(self, request: gr.Request | None, box_token: str | None, hf_token: str | None = None) -> ServiceClient:
        """A client for this request: the page's secret, else the pasted admin token, else (on a
        Space) the visitor's own Hugging Face token, which a service started with
        `HUBDEPLOY_HF_USERS` accepts for the users and organisations it lists."""
        token = self.server_token or (box_token or "").strip() or ((hf_token or None) if self.cfg.on_space else None)
        if token is None:
            raise ServiceError(401, "no service token: this deploy service needs its admin token")
        return ServiceClient(self.cfg.service_url or _own_url(request), token)

    def connect_notice(self) -> str:
        """How to get in, said the same wherever the page finds no token."""
        how = ("Sign in with Hugging Face above (if this service lets your account in), or paste its "
               "admin token under Service access" if self.cfg.on_space
               else "Open the sign-in link that hubdeploy up printed, or paste its admin token "
                    "under Service access")
        return view.notice("info", "Connect to the deploy service", how + ", then press Connect.")


class _Access:
    """The header, "Service access" (token box, Connect; Sign in on a Space) and the status line.
    Its events are the arrival: a page load (badge query, saved token, sign-in link) or Connect."""

    def __init__(self, page: _Page) -> None:
        self.page, cfg = page, page.cfg
        gr.HTML('<div class="hd-header"><div><h1>Deploy a Hub model</h1>'
                '<p>An OpenAI-compatible endpoint on one GPU — AWQ Mixture-of-Experts and multi-LoRA, '
                'with a URL, a key, code snippets and a playground when it is up.</p></div></div>')
        with gr.Accordion("Service access", open=not page.server_token, visible=not page.server_token,
                          elem_id="hd-access") as self.access_box:
            with gr.Row(equal_height=True):
                self.token_box = gr.Textbox(label="Deploy service token", type="password", scale=4,
                                            placeholder="the admin token `hubdeploy up` printed at first start",
                                            info="Kept in this browser's local storage, encrypted with a key this page holds: "
                                                 "obfuscated, not secret from whoever uses this browser profile. "
                                                 "On a shared machine, use a private window.",
                                            elem_id="hd-service-token")
                self.connect_btn = gr.Button("Connect", scale=1, elem_id="hd-connect")
        if cfg.on_space:
            with gr.Row():
                gr.LoginButton(value="Sign in with Hugging Face")
            page.hf_token = gr.State(None)
        self.status_html = gr.HTML(elem_id="hd-status")

    def arrive(self, pre: dict[str, Any], token: str, hf_token: str | None, request: gr.Request | None,
               just_given: bool) -> tuple[Any, ...]:
        """The form as a visitor with `token` sees it: a page load with a saved token, the sign-in
        link and Connect all end here, so none of them needs a reload. The badge's model, else
        the service's demo model, is prefilled (and inspected by the next step)."""
        page = self.page
        pre = dict(pre)
        signed_in = bool(page.cfg.on_space and hf_token)
        need_token = not page.server_token and not token and not signed_in
        status, refused = "", False
        if need_token:
            status = page.connect_notice()
        else:
            try:
                with page.client(request, token, hf_token) as c:
                    demo_model = c.defaults().get("model") or ""
            except ServiceError as e:  # a wrong or stale token: say so, and ask for the right one
                demo_model, status, refused = "", _err_html(e), e.status == 401
            if not pre.get("model") and demo_model:
                pre["model"] = demo_model
                pre.setdefault("gpu", view.CPU)  # the built-in demo model is there to try things without a GPU
            if just_given and token and not refused:
                status = view.notice("ok", "Token saved in this browser.")
        model = pre.get("model") or ""
        access = pre.get("access") if pre.get("access") in ("private", "protected", "public") else "private"
        return (gr.update(value=model or None, choices=[model] if model else []), pre.get("revision") or "",
                pre, token, "" if refused else token, gr.update(open=need_token or refused), status, access,
                *(pre.get(k) or 0 for k in NUMBER_PARAMS))

    def on_load(self, saved: str | None, hf_token: str | None, link_token: str | None,
                request: gr.Request) -> tuple[Any, ...]:
        """The badge's query prefills the form; a sign-in link's token (read from the URL fragment
        by READ_SIGN_IN_JS) is saved like a pasted one."""
        pre = query_prefill(dict(request.query_params) if request is not None else {})
        link_token = (link_token or "").strip()
        return self.arrive(pre, link_token or (saved or ""), hf_token, request, just_given=bool(link_token))

    def on_connect(self, token: str | None, pre: dict[str, Any] | None, model: str | None, revision: str | None,
                   hf_token: str | None, request: gr.Request) -> tuple[Any, ...]:
        """Save the pasted token and show what a reload would: the prefilled model, inspected.
        A model typed before connecting wins over the badge's (whose choices then no longer apply)."""
        pre, typed = dict(pre or {}), (model or "").strip()
        if typed and typed != pre.get("model"):
            pre = {"model": typed, "revision": (revision or "").strip()}
        return self.arrive(pre, (token or "").strip(), hf_token, request, just_given=True)

    def wire(self, demo: gr.Blocks, form: _ModelForm, endpoints: _Endpoints) -> None:
        """Load and Connect: arrive, then inspect what was prefilled, then list the endpoints."""
        hf_token = self.page.hf_token
        if self.page.cfg.on_space:  # the visitor's OAuth token first: it may be what lets them into the service
            def from_oauth(oauth_token: gr.OAuthToken | None) -> str | None:
                return oauth_token.token if oauth_token is not None else None

            first = demo.load(from_oauth, None, [hf_token], api_visibility="private", queue=False).then
        else:
            first = demo.load
        arrive_outputs = [form.model_box, form.revision_box, self.page.prefill, self.token_box, self.page.saved_token,
                          self.access_box, self.status_html, form.access_radio, form.max_len, form.max_seqs,
                          form.max_loras]
        first(self.on_load, [self.page.saved_token, hf_token, self.token_box], arrive_outputs, js=READ_SIGN_IN_JS,
              api_visibility="private", queue=False).then(
            form.inspect_prefill, form.inspect_inputs, form.inspect_outputs, api_name="inspect_on_load",
            api_visibility="private").then(
            endpoints.list_endpoints, endpoints.list_inputs, endpoints.list_outputs, api_name="list_on_load",
            api_visibility="private")
        self.connect_btn.click(self.on_connect, [self.token_box, self.page.prefill, form.model_box, form.revision_box,
                                                 hf_token], arrive_outputs, api_visibility="private").then(
            form.inspect_prefill, form.inspect_inputs, form.inspect_outputs, api_name="inspect_on_connect",
            api_visibility="private").then(
            endpoints.list_endpoints, endpoints.list_inputs, endpoints.list_outputs, api_name="list_on_connect",
            api_visibility="private")


class _ModelForm:
    """Sections 1-3 of the Deploy tab: Model (id, card, verdict, facts, badge), Hardware (the GPU
    list with each plan) and Options. Inspect fills all three from the service's report."""

    def __init__(self, page: _Page, access: _Access) -> None:
        self.page, self.access = page, access
        self._model()
        self._hardware()
        self._options()
        self.inspect_inputs = [self.model_box, self.revision_box, page.hf_token, access.token_box, page.prefill]
        self.inspect_outputs = [access.status_html, self.card_summary, self.verdict, self.facts, self.card_html,
                                self.badge_preview, self.badge_code, self.badge_html_code, self.gpu_radio,
                                self.plan_box, self.adapters_cb, self.adapters_extra, self.name_box,
                                page.report_state, self.model_box, self.quantize_cb, self.quantize_note]

    def _model(self) -> None:
        gr.Markdown("## 1 · Model", elem_classes="hd-h2")
        with gr.Row(equal_height=True):
            self.model_box = gr.Dropdown(label="Model id", choices=[], value=None, allow_custom_value=True,
                                         filterable=True, scale=5, elem_id="hd-model",
                                         info="A Hub repo (org/name) — type to search — or a local folder "
                                              "under the service's model root.")
            self.revision_box = gr.Textbox(label="Revision", placeholder="main", scale=1, elem_id="hd-revision")
            self.inspect_btn = gr.Button("Inspect", variant="secondary", scale=1, elem_id="hd-inspect")
        with gr.Row():
            with gr.Column(scale=3):
                self.card_summary = gr.HTML('<div class="hd-muted">Enter a model id to see what it is.</div>',
                                            elem_id="hd-card-summary")
                self.verdict = gr.HTML(elem_id="hd-verdict")
            with gr.Column(scale=2):
                self.facts = gr.HTML(elem_id="hd-facts")
        with gr.Accordion("Model card", open=False, elem_id="hd-card-acc"):
            self.card_html = gr.HTML(elem_id="hd-card")
        with gr.Accordion("Deploy badge for this model's card", open=False, elem_id="hd-badge-acc"):
            self.badge_preview = gr.HTML(elem_id="hd-badge-preview")
            self.badge_code = gr.Code(language="markdown", label="Markdown (paste into README.md)",
                                      interactive=False, lines=2, elem_id="hd-badge-md")
            self.badge_html_code = gr.Code(language="html", label="HTML", interactive=False, lines=2)

    def _hardware(self) -> None:
        gr.Markdown("## 2 · Hardware", elem_classes="hd-h2")
        self.gpu_radio = gr.Radio(choices=[(g.name, g.name) for g in catalog()] + [(view.CPU, view.CPU)],
                                  value=view.CPU,
                                  label="Target", elem_id="hd-gpu", elem_classes="hd-gpu-list",
                                  info="✓ fits · memory for weights of the GPU's total · longest context · "
                                       "sequences at once · estimated batch-1 decode speed")
        self.quantize_cb = gr.Checkbox(label="Quantize to AWQ 4-bit on deploy", value=False, interactive=False,
                                       elem_id="hd-quantize",
                                       info="For a 16-bit model with no AWQ variant: made once, cached, reused.")
        self.quantize_note = gr.HTML(elem_id="hd-quantize-note")
        self.plan_box = gr.HTML(elem_id="hd-plan")

    def _options(self) -> None:
        gr.Markdown("## 3 · Options", elem_classes="hd-h2")
        with gr.Row():
            self.adapters_cb = gr.CheckboxGroup(choices=[], label="LoRA adapters found on the Hub", scale=3,
                                                elem_id="hd-adapters",
                                                info="Each is served under its own name next to the base model.")
            self.adapters_extra = gr.Textbox(label="More adapters", scale=2, lines=1, elem_id="hd-adapters-extra",
                                             placeholder="org/my-lora, name=org/other-lora")
        with gr.Row():
            self.name_box = gr.Textbox(label="Endpoint name", elem_id="hd-name",
                                       info="Lowercase letters, digits and '-'; suggested from the model.")
            self.access_radio = gr.Radio([("Private — API key", "private"),
                                          ("Protected — the service's token", "protected"),
                                          ("Public — no key", "public")],
                                         value="private", label="Access", elem_id="hd-access-radio")
            self.scale_to_zero = gr.Number(label="Scale to zero after idle (s)", precision=0, value=0, minimum=0,
                                           elem_id="hd-scale-to-zero",
                                           info="0 = never. After that long without a request the endpoint "
                                                "stops and frees its device; the next request wakes it.")
        with gr.Row():
            self.max_len = gr.Number(label="Max context (tokens)", precision=0, value=0,
                                     info="0 = the plan's maximum.", elem_id="hd-max-len")
            self.max_seqs = gr.Number(label="Max concurrent sequences", precision=0, value=0,
                                      info="0 = what the KV cache allows.", elem_id="hd-max-seqs")
            self.max_loras = gr.Number(label="LoRA slots on the device", precision=0, value=0,
                                       info="0 = one per adapter, up to 4.", elem_id="hd-max-loras")
        if not self.page.cfg.on_space:
            self.page.hf_token = gr.Textbox(label="Hugging Face token (gated or private models)", type="password",
                                            placeholder="hf_…  — used to download, never stored",
                                            elem_id="hd-hf-token")
        with gr.Accordion("Advanced", open=False, elem_id="hd-advanced"):
            with gr.Row():
                self.max_rank = gr.Number(label="Max LoRA rank (0 = largest adapter's)", precision=0, value=0)
                self.kv_tokens = gr.Number(label="KV cache tokens (0 = all that fit)", precision=0, value=0)
                self.dtype = gr.Dropdown(["auto", "float16", "bfloat16", "float32"], value="auto",
                                         label="Activation dtype")
            with gr.Row():
                self.tags_box = gr.Textbox(label="Tags", placeholder="team-a, demo")
                self.restart_cb = gr.Checkbox(label="Restart automatically on failure", value=False)

    def suggest(self, data: gr.KeyUpData, hf_token: str | None) -> Any:
        hits = search_models(data.input_value, endpoint=self.page.cfg.hub_endpoint, token=hf_token or None)
        return gr.update(choices=hits) if hits else gr.update()

    def inspect(self, model: str | None, revision: str | None = None, hf_token: str | None = None,
                token: str | None = None, pre: dict[str, Any] | None = None,
                request: gr.Request | None = None) -> tuple[Any, ...]:
        """Inspect a model through the service; fill the Model, Hardware and Options sections."""
        page, cfg = self.page, self.page.cfg
        model = (model or "").strip()
        pre = pre if pre and pre.get("model") == model else {}  # the badge's choices apply to its model only
        keep = tuple(gr.update() for _ in range(16))
        if not page.server_token and not (token or "").strip() and not (cfg.on_space and hf_token):
            return (page.connect_notice(), *keep)
        if not model:
            return (view.notice("info", "Enter a model id", "For example org/name, then press Inspect."),
                    *keep)
        try:
            with page.client(request, token, hf_token) as c:
                payload = c.inspect(model, revision or None, hf_token=hf_token or None)
                taken = {ep["name"] for ep in c.list()}
        except ServiceError as e:
            return (_err_html(e), *keep)
        report, plans = payload["report"], payload["plans"]
        card = card_view(model, revision or None, report["card"], endpoint=cfg.hub_endpoint, token=hf_token or None,
                         read_local=cfg.read_local_cards)
        offer = payload.get("quantize") or {}
        quantize = bool(offer.get("recommended"))  # prefilled when the 16-bit weights need it
        choices = view.gpu_choices(view.plans_for(payload, quantize))
        names = {v for _, v in choices}
        want = pre.get("gpu")
        gpu = (next((n for n in names if want and n.lower() == want.lower()), None)
               or (offer.get("suggested_gpu") if quantize else payload.get("suggested_gpu")) or view.CPU)
        found = [a["repo_id"] for a in report.get("adapters") or [] if not a.get("error")]
        asked = [a.strip() for a in (pre.get("adapters") or "").split(",") if a.strip()]
        checked = [a for a in asked if a in found]
        extra = ", ".join(a for a in asked if a not in found)
        public = _public_url(cfg, request)
        is_repo = not model.startswith(("/", "./", "~/"))
        badge_md = badge_markdown(model, public) if is_repo else "(badges link Hub repos; this is a local folder)"
        preview = (f'{badge_html(model, public)} <span class="hd-muted">← opens this page prefilled</span>'
                   if is_repo else "")
        note = view.notice("info", card.note) if card.note else ""
        card_body = (f'<div class="hd-card-body">{card.html}</div>' if card.html
                     else '<div class="hd-muted">No card.</div>')
        adapter_choices = [(f"{a.rstrip('/').split('/')[-1]}  ({a})", a) for a in found]
        return (note, view.card_summary_html(card, report),
                view.verdict_html(report, plans, payload.get("suggested_gpu")), view.facts_html(report),
                card_body, preview, badge_md, badge_html(model, public) if is_repo else "",
                gr.update(choices=choices, value=gpu),
                view.plan_html(_plan(view.plans_for(payload, quantize), gpu), gpu),
                gr.update(choices=adapter_choices, value=checked), extra,
                pre.get("name") or view.suggest_name(model, taken), payload,
                gr.update(choices=[model], value=model),
                gr.update(value=quantize, interactive=bool(offer.get("available"))),
                view.quantize_html(offer, report))

    def inspect_prefill(self, model: str | None, revision: str | None = None, hf_token: str | None = None,
                        token: str | None = None, pre: dict[str, Any] | None = None,
                        request: gr.Request | None = None) -> tuple[Any, ...]:
        """After a load or Connect: inspect the model they prefilled. With none (no token, or one the
        service refused) nothing changes, so their notice stays; an empty note keeps it too."""
        if not (pre or {}).get("model") or (model or "").strip() != pre["model"]:
            return tuple(gr.update() for _ in range(17))
        out = self.inspect(model, revision, hf_token, token, pre, request)
        return (gr.update(), *out[1:]) if out[0] == "" else out

    def on_gpu(self, gpu: str, payload: dict[str, Any] | None, quantize: bool | None = False) -> str:
        return view.plan_html(_plan(view.plans_for(payload, quantize), gpu), gpu) if payload else ""

    def on_quantize(self, quantize: bool | None, gpu: str, payload: dict[str, Any] | None) -> tuple[Any, str]:
        """The hardware list and plan again, for the weights quantizing makes (or the 16-bit ones)."""
        if not payload:
            return gr.update(), ""
        return (gr.update(choices=view.gpu_choices(view.plans_for(payload, quantize)), value=gpu),
                self.on_gpu(gpu, payload, quantize))

    def wire_inspect(self) -> None:
        """Inspect: the button, a picked suggestion, Enter in Revision."""
        gr.on([self.inspect_btn.click, self.model_box.select, self.revision_box.submit], self.inspect,
              self.inspect_inputs, self.inspect_outputs, api_name="inspect", concurrency_limit=8)

    def wire_search_and_plan(self) -> None:
        """Hub search as they type a model id; the plan of the GPU they pick."""
        self.model_box.key_up(self.suggest, [self.page.hf_token], [self.model_box], trigger_mode="always_last",
                              show_progress="hidden", api_visibility="private")
        self.gpu_radio.change(self.on_gpu, [self.gpu_radio, self.page.report_state, self.quantize_cb], [self.plan_box],
                              api_visibility="private", queue=False)
        self.quantize_cb.input(self.on_quantize, [self.quantize_cb, self.gpu_radio, self.page.report_state],
                               [self.gpu_radio, self.plan_box], api_visibility="private", queue=False)


def _plan(plans: list[dict[str, Any]], gpu: str | None) -> dict[str, Any] | None:
    return next((p for p in plans if p["gpu"] == gpu), None)


class _Deploy:
    """Sections 4-5 of the Deploy tab: Deploy (button, progress, log tail) and the result (URL, key,
    snippets, and the playground inside it)."""

    def __init__(self, page: _Page) -> None:
        self.page = page
        gr.Markdown("## 4 · Deploy", elem_classes="hd-h2")
        self.deploy_btn = gr.Button("Deploy", variant="primary", size="lg", elem_id="hd-deploy")
        self.progress = gr.HTML(elem_id="hd-progress")
        with gr.Accordion("Log tail", open=False, elem_id="hd-logs-acc"):
            self.log_box = gr.Code(language=None, label="Endpoint log (last lines)", interactive=False, lines=8,
                                   max_lines=20, elem_id="hd-log")
        with gr.Group(visible=False, elem_id="hd-result") as self.result_group:
            gr.Markdown("## 5 · Your endpoint", elem_classes="hd-h2")
            with gr.Row():
                self.url_box = gr.Textbox(label="Endpoint URL (OpenAI base URL)", interactive=False,
                                          buttons=["copy"], elem_id="hd-url")
                self.key_box = gr.Textbox(label="API key — shown once, copy it now", interactive=False,
                                          buttons=["copy"], elem_id="hd-key")
                self.scale_box = gr.Textbox(label="Scale to zero", interactive=False, elem_id="hd-scale-now")
            with gr.Tabs():
                with gr.Tab("curl"):
                    self.curl_code = gr.Code(language="shell", label="curl", interactive=False,
                                             elem_id="hd-snippet-curl")
                with gr.Tab("openai"):
                    self.openai_code = gr.Code(language="python", label="Python · openai", interactive=False,
                                               elem_id="hd-snippet-openai")
                with gr.Tab("InferenceClient"):
                    self.ic_code = gr.Code(language="python", label="Python · huggingface_hub.InferenceClient",
                                           interactive=False, elem_id="hd-snippet-ic")
            self.playground = _Playground(page.endpoint_state)

    def deploy(self, model: str | None, revision: str | None = None, gpu: str | None = None,
               adapters: list[str] | None = None, adapters_more: str | None = None,
               max_model_len: float | None = None, max_num_seqs: float | None = None,
               lora_slots: float | None = None, access: str | None = None, name: str | None = None,
               max_lora_rank: float | None = None, kv_cache_tokens: float | None = None,
               act_dtype: str | None = None, tags: str | None = None, restart: bool | None = None,
               quantize: bool | None = None, scale_to_zero_after_s: float | None = None,
               hf_token: str | None = None, token: str | None = None,
               request: gr.Request | None = None) -> Iterator[tuple[Any, ...]]:
        """Create the endpoint, then follow its phases until it runs or fails."""
        cfg = self.page.cfg
        hidden = gr.update(visible=False)
        nothing = (gr.update(),) * 8
        try:
            spec = {"name": (name or "").strip() or view.suggest_name(model or "endpoint"),
                    "model": (model or "").strip(), "revision": (revision or "").strip() or None,
                    "adapters": view.parse_adapters(adapters, adapters_more), "gpu": gpu or view.CPU,
                    "access": access or "private",
                    "tags": [t.strip() for t in (tags or "").split(",") if t.strip()],
                    "restart_on_failure": bool(restart),
                    "scale_to_zero_after_s": _int_or_none(scale_to_zero_after_s) or 0,
                    "engine": {k: v for k, v in {
                        "max_model_len": _int_or_none(max_model_len), "max_num_seqs": _int_or_none(max_num_seqs),
                        "max_loras": _int_or_none(lora_slots), "max_lora_rank": _int_or_none(max_lora_rank),
                        "kv_cache_tokens": _int_or_none(kv_cache_tokens)}.items() if v is not None}}
            if act_dtype and act_dtype != "auto":
                spec["engine"]["dtype"] = act_dtype
            if quantize:
                spec["quantize"] = "awq"
            if not spec["model"]:
                raise ServiceError(422, "model: enter a model id first", ["body", "model"])
            c = self.page.client(request, token, hf_token)
        except (ServiceError, ValueError) as e:
            yield (_err_html(e if isinstance(e, ServiceError) else ServiceError(422, str(e))), "", hidden, *nothing)
            return
        with c:
            try:
                ep = c.create(spec, hf_token=hf_token or None)
            except ServiceError as e:
                yield (_err_html(e), "", hidden, *nothing)
                return
            key = ep.get("api_key")
            state = {"name": ep["name"], "api_key": key, "served_model_name": ep["served_model_name"],
                     "adapters": list(ep["spec"]["adapters"]), "url": None}
            key_text = key or ("(protected endpoint: send the service's admin token)"
                               if ep["spec"]["access"] == "protected" else "(public endpoint: no key needed)")
            deadline = time.monotonic() + cfg.deploy_timeout
            logs: list[str] = []
            while True:
                if ep["status"] in ("running", "failed", "deleted", "paused", "scaled_to_zero") or time.monotonic() > deadline:
                    break
                try:
                    logs = c.logs(ep["name"], MAX_LOG_LINES)
                except ServiceError:
                    pass
                yield (view.progress_html(ep), "\n".join(logs), hidden, *nothing)
                time.sleep(cfg.poll_interval)
                try:
                    ep = c.get(ep["name"])
                except ServiceError as e:
                    yield (_err_html(e), "\n".join(logs), hidden, *nothing)
                    return
            try:
                logs = c.logs(ep["name"], MAX_LOG_LINES)
            except ServiceError:
                pass
        if ep["status"] != "running":
            msg = view.progress_html(ep) if ep["status"] == "failed" else view.notice(
                "error", f"{ep['name']} is {ep['status']}", "it did not reach running in "
                f"{cfg.deploy_timeout:.0f} s" if ep["status"] == "initializing" else "",
                "Read the log tail; it keeps starting in the background (see My endpoints).")
            yield (msg, "\n".join(logs), hidden, *nothing)
            return
        state["url"] = ep["url"]
        snips = render_snippets(ep["url"], ep["served_model_name"], ep["spec"]["access"],
                                ep["spec"].get("scale_to_zero_after_s") or 0)
        models = [ep["served_model_name"], *state["adapters"]]
        yield (view.progress_html(ep), "\n".join(logs), gr.update(visible=True), ep["url"], key_text,
               snips["curl"], snips["openai"], snips["inference_client"], view.scale_to_zero_text(ep["spec"]),
               gr.update(choices=models, value=models[0]), state)

    def wire(self, form: _ModelForm, access: _Access, endpoints: _Endpoints) -> None:
        """Deploy with everything the form holds, then list the endpoints again."""
        self.deploy_btn.click(
            self.deploy, [form.model_box, form.revision_box, form.gpu_radio, form.adapters_cb, form.adapters_extra,
                          form.max_len, form.max_seqs, form.max_loras, form.access_radio, form.name_box,
                          form.max_rank, form.kv_tokens, form.dtype, form.tags_box, form.restart_cb,
                          form.quantize_cb, form.scale_to_zero, self.page.hf_token, access.token_box],
            [self.progress, self.log_box, self.result_group, self.url_box, self.key_box, self.curl_code,
             self.openai_code, self.ic_code, self.scale_box, self.playground.chat_model, self.page.endpoint_state],
            api_name="deploy", concurrency_limit=8, trigger_mode="once").then(
            endpoints.list_endpoints, endpoints.list_inputs, endpoints.list_outputs, api_name="list_after_deploy",
            api_visibility="private")


class _Playground:
    """Chat with the endpoint just deployed (its base model or one of its adapters)."""

    def __init__(self, endpoint_state: gr.State) -> None:
        self.endpoint_state = endpoint_state
        gr.Markdown("### Playground", elem_classes="hd-h3")
        with gr.Row():
            with gr.Column(scale=1, min_width=220):
                self.chat_model = gr.Dropdown(choices=[], label="Model or adapter", elem_id="hd-chat-model")
                self.system_box = gr.Textbox(label="System prompt", lines=2, value="",
                                             placeholder="optional (Mixtral/Mistral templates take "
                                                         "none: it is then put before your first message)")
                self.temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                self.max_tokens = gr.Slider(1, 1024, value=64, step=1, label="Max tokens")
            with gr.Column(scale=3):
                self.chatbot = gr.Chatbot(label="Chat", height=320, elem_id="hd-chatbot")
                with gr.Row():
                    self.chat_in = gr.Textbox(show_label=False, placeholder="Say something…", scale=5,
                                              elem_id="hd-chat-input")
                    self.send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="hd-send")

    @staticmethod
    def chat(message: str, history: list[dict[str, Any]] | None = None, state: dict[str, Any] | None = None,
             model: str | None = None, system: str | None = None, temp: float | None = None,
             max_new: float | None = None) -> Iterator[tuple[Any, ...]]:
        """Stream an answer from the endpoint (OpenAI chat completions with stream=true)."""
        history = list(history or [])
        if not (message or "").strip():
            yield history, ""
            return
        history.append({"role": "user", "content": message})
        if not state or not state.get("url"):
            history.append({"role": "assistant",
                            "content": "Deploy an endpoint first: the playground talks to it."})
            yield history, ""
            return
        history = [{"role": m["role"], "content": _text(m.get("content"))} for m in history]
        msgs = ([{"role": "system", "content": system}] if (system or "").strip() else []) + [
            dict(m) for m in history]
        history.append({"role": "assistant", "content": ""})
        kw = {"temperature": 0.7 if temp is None else float(temp), "max_tokens": int(max_new or 64)}
        target = model or state["served_model_name"]
        try:
            try:
                for delta in stream_chat(state["url"], state.get("api_key"), target, msgs, **kw):
                    history[-1]["content"] += delta
                    yield history, ""
            except ServiceError as e:
                # Templates such as Mixtral's refuse a system role: fold it into the first user turn.
                if e.status != 400 or msgs[0]["role"] != "system" or history[-1]["content"]:
                    raise
                first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
                msgs[first] = {"role": "user", "content": f"{msgs[0]['content']}\n\n{msgs[first]['content']}"}
                for delta in stream_chat(state["url"], state.get("api_key"), target, msgs[1:], **kw):
                    history[-1]["content"] += delta
                    yield history, ""
        except (ServiceError, OSError) as e:
            history[-1]["content"] += f"\n\n⚠️ {e}"
        except Exception as e:  # noqa: BLE001 - e.g. httpx errors: show them in the chat, not as a crash
            history[-1]["content"] += f"\n\n⚠️ {type(e).__name__}: {e}"
        if not history[-1]["content"]:
            history[-1]["content"] = "(empty answer)"
        yield history, ""

    def wire(self) -> None:
        gr.on([self.send_btn.click, self.chat_in.submit], self.chat,
              [self.chat_in, self.chatbot, self.endpoint_state, self.chat_model, self.system_box, self.temperature,
               self.max_tokens],
              [self.chatbot, self.chat_in], api_name="chat", concurrency_limit=8)


class _Endpoints:
    """The "My endpoints" tab: the table, and Refresh, Pause, Resume, Delete and Logs on the one picked."""

    def __init__(self, page: _Page, access: _Access) -> None:
        self.page, self.access = page, access
        with gr.Row(equal_height=False, elem_classes="hd-ep-actions"):
            self.ep_pick = gr.Dropdown(choices=[], label="Endpoint", scale=3, min_width=220, elem_id="hd-ep-pick")
            self.refresh_btn = gr.Button("Refresh", size="md", scale=1, min_width=90, elem_id="hd-refresh")
            self.pause_btn = gr.Button("Pause", size="md", scale=1, min_width=90, elem_id="hd-pause")
            self.resume_btn = gr.Button("Resume", size="md", scale=1, min_width=90, elem_id="hd-resume")
            self.delete_btn = gr.Button("Delete", variant="stop", size="md", scale=1, min_width=90,
                                        elem_id="hd-delete")
            self.logs_btn = gr.Button("Logs", size="md", scale=1, min_width=90, elem_id="hd-logs-btn")
        self.ep_table = gr.Dataframe(headers=view.ENDPOINT_COLUMNS, value=[], interactive=False, wrap=True,
                                     elem_id="hd-endpoints")
        self.ep_status = gr.HTML(elem_id="hd-ep-status")
        self.ep_logs = gr.Code(language=None, label="Endpoint log", interactive=False, lines=10, max_lines=30,
                               visible=False, elem_id="hd-ep-logs")

    @property
    def list_inputs(self) -> list[gr.components.Component]:
        return [self.access.token_box, self.ep_pick, self.page.hf_token]

    @property
    def list_outputs(self) -> list[gr.components.Component]:
        return [self.ep_table, self.ep_pick, self.ep_status]

    def list_endpoints(self, token: str | None = None, current: str | None = None, hf_token: str | None = None,
                       request: gr.Request | None = None) -> tuple[Any, ...]:
        try:
            with self.page.client(request, token, hf_token) as c:
                eps = c.list()
        except ServiceError as e:
            return gr.update(), gr.update(), _err_html(e)
        names = [ep["name"] for ep in eps]
        pick = current if current in names else (names[0] if names else None)
        msg = "" if eps else view.notice("info", "No endpoints yet", "Deploy one from the Deploy tab.")
        return view.endpoint_rows(eps), gr.update(choices=names, value=pick), msg

    def act(self, action: str):  # noqa: ANN201 - returns a Gradio handler
        def handler(name: str | None, token: str | None = None, hf_token: str | None = None,
                    request: gr.Request | None = None) -> tuple[Any, ...]:
            if not name:
                return gr.update(), gr.update(), view.notice("info", "Pick an endpoint first")
            try:
                with self.page.client(request, token, hf_token) as c:
                    if action == "pause":
                        ep = c.pause(name)
                    elif action == "resume":
                        ep = c.resume(name, hf_token=hf_token or None)
                    else:
                        ep = c.delete(name)
                    eps = c.list()
            except ServiceError as e:
                return gr.update(), gr.update(), _err_html(e)
            names = [x["name"] for x in eps]
            done = {"pause": "paused", "resume": "starting again", "delete": "deleted"}[action]
            return (view.endpoint_rows(eps), gr.update(choices=names, value=names[0] if names else None),
                    view.notice("ok", f"{ep['name']}: {done}", f"status {ep['status']}"))
        handler.__name__ = action
        return handler

    def show_logs(self, name: str | None, token: str | None = None, hf_token: str | None = None,
                  request: gr.Request | None = None) -> tuple[Any, ...]:
        if not name:
            return gr.update(visible=False), view.notice("info", "Pick an endpoint first")
        try:
            with self.page.client(request, token, hf_token) as c:
                lines = c.logs(name, 200)
        except ServiceError as e:
            return gr.update(visible=False), _err_html(e)
        return gr.update(value="\n".join(lines) or "(no log lines yet)", visible=True), ""

    @staticmethod
    def pick_row(evt: gr.SelectData) -> Any:
        row = evt.row_value if hasattr(evt, "row_value") else None
        return gr.update(value=row[0]) if row else gr.update()

    def wire(self, tabs: gr.Tabs) -> None:
        """Refresh (and opening a tab) lists them; the actions act on the picked one; a row click picks it."""
        token_box, hf_token = self.access.token_box, self.page.hf_token
        self.refresh_btn.click(self.list_endpoints, self.list_inputs, self.list_outputs, api_name="endpoints")
        tabs.select(self.list_endpoints, self.list_inputs, self.list_outputs, api_name="list_on_tab",
                    api_visibility="private")
        for btn, action in ((self.pause_btn, "pause"), (self.resume_btn, "resume"), (self.delete_btn, "delete")):
            btn.click(self.act(action), [self.ep_pick, token_box, hf_token], self.list_outputs, api_name=action)
        self.logs_btn.click(self.show_logs, [self.ep_pick, token_box, hf_token], [self.ep_logs, self.ep_status],
                            api_name="logs")
        self.ep_table.select(self.pick_row, None, [self.ep_pick], api_visibility="private", queue=False)


def build_page(config: PageConfig | None = None) -> gr.Blocks:
    """The whole page. `blocks.mount_kwargs` holds the CSS/theme for `gr.mount_gradio_app`.

    Each section builds its components in page order; its events are wired once all exist (they
    read and fill other sections' components), in the order below."""
    cfg = (config or PageConfig()).resolved()
    with gr.Blocks(title="Deploy a Hub model · hubdeploy", analytics_enabled=False) as demo:
        page = _Page(cfg)
        access = _Access(page)
        with gr.Tabs(elem_id="hd-tabs") as tabs:
            with gr.Tab("Deploy", id="deploy", elem_id="hd-tab-deploy"):
                form = _ModelForm(page, access)
                deploy = _Deploy(page)
            with gr.Tab("My endpoints", id="endpoints", elem_id="hd-tab-endpoints"):
                endpoints = _Endpoints(page, access)
        form.wire_inspect()
        access.wire(demo, form, endpoints)
        form.wire_search_and_plan()
        deploy.wire(form, access, endpoints)
        deploy.playground.wire()
        endpoints.wire(tabs)

    demo.mount_kwargs = launch_kwargs()  # type: ignore[attr-defined]
    return demo


def launch_kwargs() -> dict[str, Any]:
    """CSS and theme: Gradio 6 takes them at `launch()` / `gr.mount_gradio_app()`, not in `Blocks`."""
    return {"css": CSS_PATH.read_text(), "theme": gr.themes.Soft(primary_hue="orange", neutral_hue="slate"),
            "ssr_mode": False}
