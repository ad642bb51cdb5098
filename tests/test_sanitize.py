"""The model-card sanitizer: hostile cards render inert, ordinary cards keep their content."""
from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from hubdeploy.space.sanitize import ALLOWED_TAGS, render_card, safe_url, sanitize_html

HOSTILE_CARD = """---
license: mit
---
# Evil card

<script>window.__pwned = 1</script>
<img src="x" onerror="window.__pwned = 2">
<IMG SRC=x OnError=alert(3)>
[click me](javascript:window.__pwned=3)
<a href="javascript:window.__pwned=4">raw link</a>
<a href="jav&#x09;ascript:alert(5)">entity-split scheme</a>
<a href=" JaVaScRiPt:alert(6)">mixed case</a>
<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCg3KTwvc2NyaXB0Pg==">data link</a>
<img src="data:image/svg+xml,<svg onload=alert(8)>">
<iframe src="https://evil.example/"><p>inside iframe</p></iframe>
<object data="x.swf"><embed src="x.swf"></object>
<svg><script>alert(9)</script><circle onload="alert(10)"/></svg>
<style>body { display: none }</style>
<div style="background:url(javascript:alert(11))" onclick="alert(12)">styled div</div>
<details open ontoggle="alert(13)"><summary>More</summary>hidden</details>
<form action="https://evil.example"><input name="q" onfocus="alert(14)" autofocus></form>
<scr<script>ipt>alert(15)</script>
<!-- <img src=x onerror=alert(16)> -->
<a href="//evil.example/x">protocol-relative</a>

Normal **bold** text with a [good link](https://huggingface.co/docs) and `code`.

| a | b |
|---|---|
| 1 | 2 |
"""


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(fragment: str) -> list[tuple[str, dict[str, str | None]]]:
    c = _Collect()
    c.feed(fragment)
    return c.tags


def test_hostile_card_renders_inert() -> None:
    out = render_card(HOSTILE_CARD)
    tags = _tags(out)
    assert tags, out
    for tag, attrs in tags:
        assert tag in ALLOWED_TAGS, (tag, out)
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)
            assert name != "style"
            if name in ("href", "src"):
                assert re.match(r"^(https?:|mailto:|#|/(?!/)|[A-Za-z0-9._-])", value or ""), value
                assert "javascript" not in (value or "").lower() and not (value or "").startswith("data:")
    low = out.lower()
    for bad in ("<script", "<iframe", "<object", "<embed", "<svg", "<style", "<form", "<input",
                "onerror=", "onclick=", "ontoggle=", "onload=", "evil.example/x"):
        assert bad not in low, (bad, out)
    assert "inside iframe" not in out and "display: none" not in out
    # a refused Markdown link stays visible as plain text, never as a link
    assert "[click me](javascript:window.__pwned=3)" in out and '="javascript' not in low


def test_ordinary_content_survives() -> None:
    out = render_card(HOSTILE_CARD)
    assert "<h1>Evil card</h1>" in out
    assert "<strong>bold</strong>" in out and "<code>code</code>" in out
    assert '<a href="https://huggingface.co/docs" rel="nofollow noopener noreferrer" target="_blank">good link</a>' in out
    assert "<table>" in out and "<td>2</td>" in out
    assert "styled div" in out and "<summary>More</summary>" in out
    assert "license: mit" not in out  # front matter is shown as metadata, not as text


def test_text_is_escaped_and_output_balanced() -> None:
    out = sanitize_html("<p>1 < 2 & <b>bold <i>open</p> tail &lt;script&gt;")
    assert out == "<p>1 &lt; 2 &amp; <b>bold <i>open</i></b></p> tail &lt;script&gt;"
    assert sanitize_html("</div></p>text") == "text"


@pytest.mark.parametrize("url,base,want", [
    ("https://x.org/a", None, "https://x.org/a"),
    ("HTTP://x.org", None, "HTTP://x.org"),
    ("mailto:a@b.c", None, "mailto:a@b.c"),
    ("#sec", "https://hub/org/m/resolve/main/", "#sec"),
    ("img/plot.png", "https://hub/org/m/resolve/main/", "https://hub/org/m/resolve/main/img/plot.png"),
    ("javascript:alert(1)", None, None),
    ("  java\nscript:alert(1)", None, None),
    ("vbscript:x", None, None),
    ("data:image/png;base64,AAAA", None, None),
    ("file:///etc/passwd", None, None),
    ("//evil.example", None, None),
])
def test_safe_url(url: str, base: str | None, want: str | None) -> None:
    assert safe_url(url, base) == want


def test_relative_images_resolve_against_the_repo() -> None:
    out = render_card("![plot](plot.png)", base_url="http://hub.test/org/m/resolve/abc/")
    assert '<img src="http://hub.test/org/m/resolve/abc/plot.png" alt="plot">' in out
