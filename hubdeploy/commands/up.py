"""`hubdeploy up`: run the deploy service (REST API + page) for a team on one machine."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


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
                            default_adapters=default_adapters, hf_users=args.hf_user)
    mount_page(app, _page_blocks())
    print(f"hubdeploy: deploy service at http://{args.host}:{args.port}/  (API: /api, docs: /docs)", flush=True)
    if app.state.new_admin_token:
        print(f"hubdeploy: admin token (shown once, keep it): {app.state.new_admin_token}", flush=True)
    if default_model:
        print(f"hubdeploy: demo model: {default_model}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
