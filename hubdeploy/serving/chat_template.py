"""Render a model's Jinja2 chat template exactly as `transformers.apply_chat_template` does.

Templates come from untrusted Hub repos, so they run in Jinja2's immutable sandbox with the
same globals transformers offers (`raise_exception`, `strftime_now`, a non-escaping `tojson`),
and with `trim_blocks`/`lstrip_blocks` so whitespace matches. No remote code is ever run.
A template's `raise_exception(...)` surfaces as `ChatTemplateError` (a `ValueError`) so the
server can answer 400 with the template's own message instead of a 500.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "render_chat", "load_chat_template", "compile_chat_template"]


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (its `raise_exception`) or failed to render."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson HTML-escapes; transformers overrides it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile once per template text (cached); raises `ChatTemplateError` on a syntax error."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    **special_tokens: Any,
) -> str:
    """Render `messages` (OpenAI-style dicts) to the prompt text the model was trained on.

    `special_tokens` are passed as template variables (`bos_token="<s>"`, `eos_token=...`,
    and any template kwarg such as `enable_thinking`), as transformers passes them.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
    compiled = compile_chat_template(template)
    try:
        return compiled.render(
            messages=messages, tools=tools, documents=None,
            add_generation_prompt=add_generation_prompt, **special_tokens,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e


def load_chat_template(model_dir: str | Path, name: str = "default") -> str | None:
    """The chat template of a local model directory, or None when it has none.

    Looks at `chat_template.jinja` first (newer transformers save it there), then
    `tokenizer_config.json`'s `chat_template` as a string or a list of `{name, template}`.
    """
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    cfg_path = model_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{cfg_path} is not valid JSON: {e}") from e
    tpl = cfg.get("chat_template")
    if tpl is None or isinstance(tpl, str):
        return tpl
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        if name in named:
            return named[name]
        if "default" in named:
            return named["default"]
        raise ChatTemplateError(
            f"{cfg_path} has chat templates {sorted(k for k in named if k)} but none named {name!r}"
        )
    raise ChatTemplateError(f"{cfg_path}: chat_template must be a string or a list, got {type(tpl).__name__}")
