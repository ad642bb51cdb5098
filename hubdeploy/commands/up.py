"""`hubdeploy up`: run the deploy service (REST API + page) for a team on one machine."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import quote

TOKEN_ENV = "HUBDEPLOY_ADMIN_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run the deploy service (web page + REST API)",
                       description="Run the deploy service. With no arguments it builds a tiny demo model "
                                   "once and serves everything on 127.0.0.1:7860, no GPU or network needed.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--data-dir", default=os.environ.get("HUBDEPLOY_DATA_DIR", "~/.hubdeploy"),
                   help="state, logs and local models (default ~/.hubdeploy)")
    p.add_argument("--hub-endpoint", default=None, help="Hub URL (default $HF_ENDPOINT or huggingface.co)")
    p.add_argument("--allowed-model-root", action="append", default=None, metavar="DIR",
                   help="a folder local models may be deployed from (repeatable; default DATA_DIR/models)")
    p.add_argument("--cpu-slots", type=int, default=1, help="endpoints that may run on the CPU at once (default 1)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="where endpoints run: child processes here (local, default) or actors on a Ray "
                        "cluster (ray; pip install 'hubdeploy[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="the Ray cluster to join with --backend ray (default $RAY_ADDRESS, else a local one)")
    p.add_argument("--public-url", default=os.environ.get("HUBDEPLOY_PUBLIC_URL"), metavar="URL",
                   help="the service's URL as users reach it (behind a proxy, on a Space); endpoint URLs are "
                        "URL/endpoints/<name>/v1 (default $HUBDEPLOY_PUBLIC_URL, else the URL each request came to)")
    p.add_argument("--no-demo", action="store_true", help="do not build the tiny demo model")
    p.add_argument("--hf-user", action="append", default=None, metavar="NAME",
                   help="a Hugging Face user or organisation let in with its own HF token (OAuth on a Space); "
                        "repeatable (default $HUBDEPLOY_HF_USERS, comma-separated)")
    p.set_defaults(func=run)


def _page_blocks() -> object | None:
    """The Gradio page from `space/`, when that package offers one; None otherwise."""
    try:
        from hubdeploy.space import app as space_app
    except ImportError:
        return None
    for attr in ("build_page", "build_demo", "build_blocks"):
        fn = getattr(space_app, attr, None)
        if callable(fn):
            return fn()
    return None


def browse_url(host: str, port: int) -> str:
    """The page's address as a browser on this machine opens it (a wildcard bind means loopback)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def sign_in_url(base_url: str, token: str) -> str:
    """One click signs a browser in: the token rides in the URL fragment (as Jupyter's does in its
    query), which browsers never send, so it reaches no server or proxy log; the page's script
    saves it as Connect saves a pasted one and takes it out of the address bar."""
    return f"{base_url.rstrip('/')}/#token={quote(token, safe='')}"


def sign_in_line(base_url: str, new_token: str | None, given_token: str | None, tty: bool) -> str | None:
    """The one console line that carries the admin token, or None when there is none to give (a later
    start keeps only its hash). A made token is shown this once, wherever the output goes; one the
    operator gave (HUBDEPLOY_ADMIN_TOKEN) is shown only to a terminal, never written into a log file
    (the link then names the variable, as Jupyter hides a token it did not make)."""
    if new_token:
        return f"hubdeploy: sign in: {sign_in_url(base_url, new_token)}  (admin token after #token=, shown once: keep it)"
    if not given_token:
        return None
    if tty:
        return f"hubdeploy: sign in: {sign_in_url(base_url, given_token)}"
    return f"hubdeploy: sign in: {base_url.rstrip('/')}/#token=<{TOKEN_ENV}>  (not echoed: output is not a terminal)"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from hubdeploy.hub_integration.demo import demo_adapters, ensure_demo_model
    from hubdeploy.hub_integration.service import build_service_app, mount_page

    data_dir = Path(args.data_dir).expanduser().resolve()
    default_model, default_adapters = None, None
    if not args.no_demo:
        print(f"hubdeploy: preparing the demo model under {data_dir / 'models'} ...", flush=True)
        default_model = str(ensure_demo_model(data_dir))
        default_adapters = demo_adapters(data_dir)
    roots = args.allowed_model_root or [data_dir / "models"]
    app = build_service_app(data_dir, hub_endpoint=args.hub_endpoint, allowed_model_roots=roots,
                            cpu_slots=args.cpu_slots, default_model=default_model,
                            default_adapters=default_adapters, hf_users=args.hf_user, backend=args.backend,
                            public_url=args.public_url,
                            **({"address": args.ray_address} if args.backend == "ray" else {}))
    mount_page(app, _page_blocks())
    base = browse_url(args.host, args.port)
    print(f"hubdeploy: deploy service at {base}/  (API: /api, docs: /docs)", flush=True)
    print(f"hubdeploy: endpoints answer at {(args.public_url or base).rstrip('/')}/endpoints/<name>/v1", flush=True)
    line = sign_in_line(base, app.state.new_admin_token, os.environ.get(TOKEN_ENV), sys.stdout.isatty())
    if line:
        print(line, flush=True)
    if default_model:
        print(f"hubdeploy: demo model: {default_model}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
