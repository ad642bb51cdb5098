"""What the page reads from the Hub itself: search suggestions and the model card.

The deploy service's `/api/inspect` answers what the model *is* (the ModelReport); the card
text, its title and download count, and search-as-you-type come straight from the Hub the
page talks to (`HF_ENDPOINT`), through `huggingface_hub`.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubdeploy.space.sanitize import render_card

log = logging.getLogger(__name__)
_TITLE_RE = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.M)


@dataclass
class CardView:
    """The card summary the page shows above the report."""

    title: str
    url: str | None = None  # the model page on the Hub
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    base_model: list[str] = field(default_factory=list)
    pipeline_tag: str | None = None
    downloads: int | None = None
    likes: int | None = None
    html: str = ""  # the sanitized, rendered card
    note: str | None = None  # why the card text is missing, when it is


def hub_endpoint(explicit: str | None = None) -> str:
    from huggingface_hub import constants

    return (explicit or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def search_models(query: str, *, endpoint: str | None = None, token: str | None = None, limit: int = 8) -> list[str]:
    """Repo ids matching `query` (the Hub's own search), most downloaded first; [] on any failure."""
    query = (query or "").strip()
    if len(query) < 2 or query.startswith(("/", "./", "~")):
        return []
    from huggingface_hub import HfApi

    try:
        api = HfApi(endpoint=hub_endpoint(endpoint), token=token or False)
        return [m.id for m in api.list_models(search=query, limit=limit, sort="downloads")]
    except Exception as e:  # noqa: BLE001 - suggestions are a convenience; the inspect call reports errors
        log.warning("Hub search for suggestions failed (%s: %s); the model box still accepts any id",
                    type(e).__name__, e)
        return []


def _title(markdown: str, fallback: str) -> str:
    from hubdeploy.space.sanitize import strip_front_matter

    m = _TITLE_RE.search(strip_front_matter(markdown))
    return m.group(1).strip() if m else fallback


def card_view(model: str, revision: str | None, card: dict[str, Any], *, endpoint: str | None = None,
              token: str | None = None, read_local: bool = True) -> CardView:
    """Title, metadata and sanitized card of `model` (a Hub repo id, or a local directory when allowed).

    `card` is the report's `card` section (license, tags, base model), so the two never disagree.
    """
    name = model.rstrip("/").split("/")[-1]
    view = CardView(title=name, license=card.get("license"), tags=list(card.get("tags") or []),
                    base_model=list(card.get("base_model") or []), pipeline_tag=card.get("pipeline_tag"))
    if model.startswith(("/", "./", "~/")):
        readme = Path(model).expanduser() / "README.md"
        if read_local and readme.is_file():
            text = readme.read_text(errors="replace")
            view.title, view.html = _title(text, name), render_card(text)
        else:
            view.note = "This local model has no card the page can read."
        return view
    base = hub_endpoint(endpoint)
    view.url = f"{base}/{model}"
    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = HfApi(endpoint=base, token=token or False).model_info(model, revision=revision or "main")
        view.downloads, view.likes = getattr(info, "downloads", None), getattr(info, "likes", None)
        sha = info.sha or revision or "main"
        path = hf_hub_download(model, "README.md", revision=sha, endpoint=base, token=token or False)
        text = Path(path).read_text(errors="replace")
        view.title = _title(text, name)
        view.html = render_card(text, base_url=f"{base}/{model}/resolve/{sha}/")
    except Exception as e:  # noqa: BLE001 - the card is shown when it can be; the report says the rest
        view.note = f"The model card could not be read ({type(e).__name__})."
    return view
