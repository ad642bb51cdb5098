"""Model cards are untrusted: render their Markdown, then keep only an allow-list of HTML.

Written on the stdlib `html.parser` (no bleach/nh3 here). What survives: structural and
text tags, tables, images and links; attributes only from a per-tag allow-list; URLs only
`http`, `https`, `mailto` or relative (resolved against the repo when a base is given).
Dropped with their content: `script`, `style`, `iframe`, `object`, `embed` and friends.
Every `on*` attribute, `style`, `srcdoc`, `javascript:`/`data:`/`vbscript:` URL is gone.
"""
from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from urllib.parse import urljoin

from markdown_it import MarkdownIt

ALLOWED_TAGS = frozenset({
    "a", "abbr", "b", "blockquote", "br", "caption", "code", "dd", "del", "details", "div", "dl", "dt",
    "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li", "ol", "p", "pre",
    "q", "s", "samp", "small", "span", "strong", "sub", "summary", "sup", "table", "tbody", "td",
    "tfoot", "th", "thead", "tr", "u", "ul",
})
# Removed together with everything inside them (their text is code or embedded documents).
DROP_WITH_CONTENT = frozenset({
    "script", "style", "iframe", "object", "embed", "applet", "noscript", "template", "frame",
    "frameset", "noembed", "noframes", "svg", "math", "textarea", "select", "title", "head", "xmp",
})
VOID_TAGS = frozenset({"br", "hr", "img"})
GLOBAL_ATTRS = frozenset({"title", "align"})
TAG_ATTRS: dict[str, frozenset[str]] = {
    "a": frozenset({"href"}),
    "img": frozenset({"src", "alt", "width", "height"}),
    "td": frozenset({"colspan", "rowspan"}),
    "th": frozenset({"colspan", "rowspan", "scope"}),
    "ol": frozenset({"start"}),
    "code": frozenset({"class"}),
    "details": frozenset({"open"}),
}
URL_ATTRS = frozenset({"href", "src"})
SAFE_SCHEMES = ("http", "https", "mailto")
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):")
_CTRL_RE = re.compile(r"[\x00-\x20\x7f]+")
_CODE_CLASS_RE = re.compile(r"^language-[A-Za-z0-9_+\-]{1,32}$")
_NUMBER_RE = re.compile(r"^[0-9]{1,4}%?$")
_FRONT_MATTER_RE = re.compile(r"\A\s*---\n.*?\n---\s*\n", re.S)

_md = MarkdownIt("commonmark", {"html": True, "linkify": False}).enable("table").enable("strikethrough")


def safe_url(url: str, base_url: str | None = None) -> str | None:
    """The URL if it is http(s)/mailto/relative (resolved against `base_url`), else None."""
    compact = _CTRL_RE.sub("", url)  # browsers ignore tabs/newlines/spaces inside the scheme
    m = _SCHEME_RE.match(compact)
    if m:
        return compact if m.group(1).lower() in SAFE_SCHEMES else None
    if compact.startswith("//"):
        return None  # protocol-relative: leaves the page's origin without saying so
    if base_url and not compact.startswith("#"):
        return urljoin(base_url, url.strip())
    return url.strip()


class _Sanitizer(HTMLParser):
    def __init__(self, base_url: str | None) -> None:
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self.out: list[str] = []
        self.open: list[str] = []
        self.skip_depth = 0  # > 0 while inside a DROP_WITH_CONTENT element
        self.skip_tag: str | None = None

    # -- tags ------------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, self_closing=False)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._start(tag, attrs, self_closing=True)

    def _start(self, tag: str, attrs: list[tuple[str, str | None]], self_closing: bool) -> None:
        tag = tag.lower()
        if self.skip_depth:
            if tag == self.skip_tag and not self_closing:
                self.skip_depth += 1
            return
        if tag in DROP_WITH_CONTENT:
            if not self_closing and tag not in VOID_TAGS:
                self.skip_depth, self.skip_tag = 1, tag
            return
        if tag not in ALLOWED_TAGS:
            return  # unknown tag: drop the tag, keep its text
        kept = self._attrs(tag, attrs)
        if kept is None:
            return
        self.out.append(f"<{tag}{kept}>")
        if tag not in VOID_TAGS:
            if self_closing:
                self.out.append(f"</{tag}>")
            else:
                self.open.append(tag)

    def _attrs(self, tag: str, attrs: list[tuple[str, str | None]]) -> str | None:
        allowed = GLOBAL_ATTRS | TAG_ATTRS.get(tag, frozenset())
        parts: list[str] = []
        for name, value in attrs:
            name = name.lower()
            if name not in allowed or name.startswith("on"):
                continue
            value = value if value is not None else ""
            if name in URL_ATTRS:
                url = safe_url(value, self.base_url)
                if url is None:
                    continue
                value = url
            elif name == "class" and not _CODE_CLASS_RE.match(value):
                continue
            elif name in ("width", "height", "colspan", "rowspan", "start") and not _NUMBER_RE.match(value):
                continue
            elif name == "align" and value.lower() not in ("left", "right", "center"):
                continue
            elif name == "scope" and value.lower() not in ("row", "col", "rowgroup", "colgroup"):
                continue
            parts.append(f' {name}="{html.escape(value, quote=True)}"')
        if tag == "img" and not any(p.startswith(" src=") for p in parts):
            return None  # an image without a safe source is nothing to show
        if tag == "a" and any(p.startswith(" href=") for p in parts):
            parts.append(' rel="nofollow noopener noreferrer" target="_blank"')
        return "".join(parts)

    def handle_endtag(self, tag: str) -> None:
        tag = tag.lower()
        if self.skip_depth:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if not self.skip_depth:
                    self.skip_tag = None
            return
        if tag not in self.open:
            return  # stray end tag
        while self.open:  # close what is still open inside it, so the output stays well-formed
            t = self.open.pop()
            self.out.append(f"</{t}>")
            if t == tag:
                break

    # -- text ------------------------------------------------------------------------
    def handle_data(self, data: str) -> None:
        if not self.skip_depth:
            self.out.append(html.escape(data, quote=False))

    def handle_comment(self, data: str) -> None:  # comments can hide conditional markup
        return

    def handle_decl(self, decl: str) -> None:
        return

    def handle_pi(self, data: str) -> None:
        return

    def unknown_decl(self, data: str) -> None:
        return

    def result(self) -> str:
        self.close()
        while self.open:
            self.out.append(f"</{self.open.pop()}>")
        return "".join(self.out)


def sanitize_html(fragment: str, base_url: str | None = None) -> str:
    """An HTML fragment with only allow-listed tags, attributes and URLs left (inert)."""
    s = _Sanitizer(base_url)
    s.feed(fragment)
    return s.result()


def strip_front_matter(markdown: str) -> str:
    """The card body without its YAML header (the page shows the metadata separately)."""
    return _FRONT_MATTER_RE.sub("", markdown, count=1)


def render_card(markdown: str, base_url: str | None = None) -> str:
    """Model card Markdown -> safe HTML (front matter removed, raw HTML sanitized)."""
    return sanitize_html(_md.render(strip_front_matter(markdown)), base_url)
