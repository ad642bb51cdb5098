"""The Deploy badge: link, Markdown, HTML, SVG and the `hubdeploy badge` command."""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from hubdeploy.hub_integration.badge import badge_html, badge_markdown, badge_svg, deploy_link

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_deploy_link_carries_every_prefill_field() -> None:
    link = deploy_link("org/My-Model", "https://deploy.example.org/", revision="v1.0",
                       adapters=["org/lora-a", " org/lora-b "], gpu="H100-80GB")
    parts = urlsplit(link)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "deploy.example.org", "/deploy")
    assert parse_qs(parts.query) == {"model": ["org/My-Model"], "revision": ["v1.0"],
                                     "adapters": ["org/lora-a,org/lora-b"], "gpu": ["H100-80GB"]}
    assert deploy_link("org/m", "http://127.0.0.1:7860") == "http://127.0.0.1:7860/deploy?model=org/m"


def test_hostile_values_are_encoded() -> None:
    link = deploy_link("org/m", "https://d.example", revision="x&gpu=evil", gpu='"><script>')
    q = parse_qs(urlsplit(link).query)
    assert q["revision"] == ["x&gpu=evil"] and q["gpu"] == ['"><script>']
    html = badge_html("org/m", "https://d.example", gpu='"><script>')
    assert "<script>" not in html and "&#34;&gt;" not in html.split("href=")[0]
    md = badge_markdown("org/m)](javascript:alert(1)", "https://d.example")
    assert "](javascript:" not in md and md.count("](") == 2


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.a: list[dict[str, str | None]] = []
        self.img: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("a", "img"):
            getattr(self, tag).append(dict(attrs))


def test_markdown_and_html_point_at_the_page_and_the_svg() -> None:
    md = badge_markdown("org/m", "https://d.example", adapters=["org/l"])
    assert md == ("[![Deploy with hubdeploy](https://d.example/badge.svg)]"
                  "(https://d.example/deploy?model=org/m&adapters=org/l)")
    p = _Links()
    p.feed(badge_html("org/m", "https://d.example", adapters=["org/l"]))
    assert p.a[0]["href"] == "https://d.example/deploy?model=org/m&adapters=org/l"
    assert p.img[0]["src"] == "https://d.example/badge.svg" and p.img[0]["alt"] == "Deploy with hubdeploy"


def test_svg_is_well_formed_and_sized_to_its_text() -> None:
    short, long = ET.fromstring(badge_svg()), ET.fromstring(badge_svg(message="a much longer message"))
    assert short.tag.endswith("svg") and int(long.get("width")) > int(short.get("width"))
    texts = [t.text for t in short.iter() if t.tag.endswith("text")]
    assert "Deploy" in texts and "hubdeploy" in texts
    assert "&lt;b&gt;" in badge_svg(label="<b>")  # autoescaped


@pytest.mark.parametrize("bad", ["ftp://x", "deploy.example.org", "javascript:alert(1)"])
def test_bad_deploy_url_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="http"):
        deploy_link("org/m", bad)


def test_cli_prints_markdown_and_html() -> None:
    out = subprocess.run([sys.executable, "-m", "hubdeploy", "badge", "org/m", "--deploy-url", "https://d.example",
                          "--gpu", "A10G"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "[![Deploy with hubdeploy](https://d.example/badge.svg)](https://d.example/deploy?model=org/m&gpu=A10G)" in out.stdout
    assert '<a href="https://d.example/deploy?model=org/m&amp;gpu=A10G"' in out.stdout
    bad = subprocess.run([sys.executable, "-m", "hubdeploy", "badge", "org/m", "--deploy-url", "ftp://x"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "http(s) URL" in bad.stderr
