"""`serving.chat_template.render_chat` renders exactly what transformers' apply_chat_template
renders (same text, or the same refusal), in a sandbox, from every place a template lives."""
from __future__ import annotations

import json

import pytest

from hubdeploy.serving.chat_template import ChatTemplateError, load_chat_template, render_chat

ARCHS = ["mixtral", "qwen3_moe", "llama"]

WITH_SYSTEM = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hello! How are you?"},
    {"role": "assistant", "content": "Fine, thank you."},
    {"role": "user", "content": "Write a short poem about the sea."},
]
NO_SYSTEM = WITH_SYSTEM[1:]
NOT_ALTERNATING = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]


def _specials(model_dir) -> dict[str, str | None]:
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    return {k: cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}


def _both(tok, template: str, specials: dict, messages: list[dict], add_generation_prompt: bool, tools=None):
    """(transformers result, ours): each the rendered text or ('error', message)."""
    results = []
    for fn in (
        lambda: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools),
        lambda: render_chat(template, messages, add_generation_prompt=add_generation_prompt, tools=tools, **specials),
    ):
        try:
            results.append(fn())
        except Exception as e:  # transformers raises jinja2's TemplateError, we raise ChatTemplateError
            results.append(("error", str(e)))
    return results


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [WITH_SYSTEM, NO_SYSTEM, NOT_ALTERNATING], ids=["system", "no_system", "not_alternating"])
def test_render_matches_transformers(tiny_models, arch, add_generation_prompt, messages) -> None:
    from transformers import AutoTokenizer

    d = tiny_models(arch, "none")
    tok = AutoTokenizer.from_pretrained(d)
    template = load_chat_template(d)
    assert template and template == tok.chat_template
    theirs, ours = _both(tok, template, _specials(d), messages, add_generation_prompt)
    assert ours == theirs


def test_mixtral_refuses_system_message_with_template_error(tiny_models) -> None:
    d = tiny_models("mixtral", "none")
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render_chat(load_chat_template(d), WITH_SYSTEM, **_specials(d))
    text = render_chat(load_chat_template(d), NO_SYSTEM, **_specials(d))
    assert text == "<s>[INST] Hello! How are you? [/INST]Fine, thank you.</s>[INST] Write a short poem about the sea. [/INST]"
    assert isinstance(ChatTemplateError("x"), ValueError)


def test_llama_and_qwen_accept_system(tiny_models) -> None:
    d = tiny_models("llama", "none")
    text = render_chat(load_chat_template(d), WITH_SYSTEM, **_specials(d))
    assert text.startswith("<s> [INST] You are a terse assistant.\n\nHello! How are you? [/INST]")
    q = tiny_models("qwen3_moe", "none")
    text = render_chat(load_chat_template(q), WITH_SYSTEM, **_specials(q))
    assert text.startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n")


def test_qwen_tools_and_tool_calls_match_transformers(tiny_models) -> None:
    from transformers import AutoTokenizer

    d = tiny_models("qwen3_moe", "none")
    tok = AutoTokenizer.from_pretrained(d)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & here",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
    ]
    theirs, ours = _both(tok, load_chat_template(d), _specials(d), messages, True, tools=tools)
    assert ours == theirs
    assert "Weather <now> & here" in ours  # tojson does not HTML-escape
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in ours


def test_sandbox_blocks_python_internals() -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat(evil, NO_SYSTEM)
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat("{% for m in messages %}", NO_SYSTEM)
    with pytest.raises(ChatTemplateError, match="list of"):
        render_chat("{{ messages }}", "hello")  # type: ignore[arg-type]


def test_helpers_available() -> None:
    tpl = "{{ strftime_now('%Y') | length }} {{ {'a': '<b>'} | tojson }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    assert render_chat(tpl, NO_SYSTEM) == '4 {"a": "<b>"}user'


def test_load_chat_template_forms(tmp_path) -> None:
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "plain"}))
    assert load_chat_template(tmp_path) == "plain"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]}))
    assert load_chat_template(tmp_path) == "D"
    assert load_chat_template(tmp_path, name="tool_use") == "T"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "rag", "template": "R"}]}))
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path) == "J"  # the separate file wins, as in transformers
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    (tmp_path / "chat_template.jinja").unlink()
    assert load_chat_template(tmp_path) is None
