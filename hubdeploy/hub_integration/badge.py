"""The Deploy badge: a link to `<deploy service>/deploy?model=…` that opens the prefilled page.

Markdown and HTML for model cards and the SVG image itself are rendered from the Jinja2
templates in `templates/` (`badge.md.j2`, `badge.html.j2`, `badge.svg.j2`); the deploy
service serves the SVG at `/badge.svg`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import jinja2

DEFAULT_DEPLOY_URL = "http://127.0.0.1:7860"
BADGE_PATH = "/badge.svg"
ALT_TEXT = "Deploy with hubdeploy"
_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


@lru_cache(maxsize=1)
def template_env() -> jinja2.Environment:
    """Templates of `templates/`; HTML and SVG are autoescaped, Markdown is escaped by hand."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
                              autoescape=lambda name: bool(name) and name.endswith((".html.j2", ".svg.j2")),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=False)


def default_deploy_url() -> str:
    """`HUBDEPLOY_URL` when set (a Space secret or the operator's shell), else the local service."""
    return os.environ.get("HUBDEPLOY_URL") or DEFAULT_DEPLOY_URL


def _base(deploy_url: str | None) -> str:
    url = (deploy_url or default_deploy_url()).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"deploy URL {url!r} must be an http(s) URL such as https://deploy.example.org")
    return url


def deploy_link(model: str, deploy_url: str | None = None, *, revision: str | None = None,
                adapters: Sequence[str] = (), gpu: str | None = None) -> str:
    """`<deploy_url>/deploy?model=…&revision=…&adapters=a,b&gpu=…` (only the parts given)."""
    if not model or not model.strip():
        raise ValueError("a model id (org/name) is needed for the badge link")
    query = {"model": model.strip()}
    if revision:
        query["revision"] = revision
    if adapters:
        query["adapters"] = ",".join(a.strip() for a in adapters if a.strip())
    if gpu:
        query["gpu"] = gpu
    return f"{_base(deploy_url)}/deploy?{urlencode(query, safe='/,:')}"


def badge_image_url(deploy_url: str | None = None) -> str:
    return _base(deploy_url) + BADGE_PATH


def badge_markdown(model: str, deploy_url: str | None = None, **link_kw: object) -> str:
    """Markdown for a model card: the badge image linking to the prefilled page."""
    link = deploy_link(model, deploy_url, **link_kw)  # type: ignore[arg-type]
    # urlencode leaves no ')' or spaces in the link, so the Markdown link cannot be broken out of.
    return template_env().get_template("badge.md.j2").render(
        alt=ALT_TEXT, image_url=badge_image_url(deploy_url), link=link.replace(")", "%29")).strip()


def badge_html(model: str, deploy_url: str | None = None, **link_kw: object) -> str:
    """The same badge as an HTML snippet (for cards that use HTML, and for web pages)."""
    link = deploy_link(model, deploy_url, **link_kw)  # type: ignore[arg-type]
    return template_env().get_template("badge.html.j2").render(
        alt=ALT_TEXT, image_url=badge_image_url(deploy_url), link=link).strip()


def _text_width(text: str) -> int:
    """Approximate width of Verdana 11px text (the shields.io look), in pixels."""
    narrow, wide = set("ijlt.,:;!|'1 frI"), set("mwMW@%")
    return int(sum(4 if c in narrow else 10 if c in wide else 7 for c in text)) + 10


def badge_svg(label: str = "Deploy", message: str = "hubdeploy", color: str = "#ff9d00") -> str:
    """The badge image (flat style, two halves), as SVG text."""
    lw, mw = _text_width(label), _text_width(message)
    return template_env().get_template("badge.svg.j2").render(
        label=label, message=message, color=color, label_width=lw, message_width=mw, width=lw + mw)
