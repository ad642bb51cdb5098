"""Standalone entry: the deploy page on a Hugging Face Space (or anywhere), against a remote service.

The service URL and its admin token come from the Space secrets `HUBDEPLOY_URL` and
`HUBDEPLOY_TOKEN`; the Hub from `HF_ENDPOINT` (default huggingface.co). `hubdeploy up`
imports `build_page` from here to mount the same page at `/`.
"""
from __future__ import annotations

import os

import gradio as gr

from hubdeploy.space.page import PageConfig, build_page, launch_kwargs

__all__ = ["build_page", "main"]


def main() -> None:
    """Serve the page on its own (what a Space runs): `python -m space.app`."""
    from hubdeploy.space.client import URL_ENV

    if not os.environ.get(URL_ENV):
        raise SystemExit(f"set {URL_ENV} to the deploy service's URL (and HUBDEPLOY_TOKEN to its admin token); "
                         "on a Space, add both as secrets in the Space settings")
    demo: gr.Blocks = build_page(PageConfig())
    demo.queue(default_concurrency_limit=8).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
        server_port=int(os.environ.get("PORT", os.environ.get("GRADIO_SERVER_PORT", "7860"))), **launch_kwargs())


if __name__ == "__main__":
    main()
