"""Incremental detokenizer: UTF-8 split across tokens, stop strings across token boundaries."""
from __future__ import annotations

from pathlib import Path

import pytest

from serving.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    from serving.tiny.tokenizer import write_tokenizer

    d: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, "llama")
    (d / "generation_config.json").write_text('{"eos_token_id": [2, 77]}')
    return load_tokenizer(d)


def stream(tok: Tokenizer, ids: list[int], stop: list[str] | None = None, prompt: list[int] | None = None):
    det = IncrementalDetokenizer(tok, prompt or tok.encode("Hi"), stop)
    deltas = []
    for i, t in enumerate(ids):
        delta, hit = det.add(t, finished=i == len(ids) - 1)
        deltas.append(delta)
        if hit:
            return deltas, True, det
    return deltas, False, det


def test_loads_eos_from_tokenizer_and_generation_config(tok: Tokenizer) -> None:
    assert tok.eos_token_id == tok.token_to_id("</s>")
    assert tok.eos_token_ids[0] == tok.eos_token_id and 77 in tok.eos_token_ids
    assert tok.encode("hello")[0] == tok.bos_token_id  # tokenizer.json's post-processor adds BOS


def test_multibyte_characters_split_across_tokens_never_emit_replacement(tok: Tokenizer) -> None:
    text = " héllo 日本語 and 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    # the tiny byte-level vocabulary has no merges for these: characters span several tokens
    assert len(ids) > len(text.split())
    assert any("\ufffd" in tok.decode([t]) for t in ids), "test needs a character split across tokens"
    deltas, hit, det = stream(tok, ids)
    assert not hit
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    assert det.text == text


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(tok: Tokenizer) -> None:
    text = " the quick brown fox jumps over the lazy dog"
    ids = tok.encode(text, add_special_tokens=False)
    stop = "fox jum"
    pieces = [tok.decode([t]) for t in ids]
    assert stop not in pieces, "the stop string must span several tokens"
    deltas, hit, det = stream(tok, ids, stop=[stop])
    assert hit
    out = "".join(deltas)
    assert out == " the quick brown "
    assert det.text == out
    # a held-back partial match that turns out not to be a stop is released later
    deltas, hit, _ = stream(tok, ids, stop=["fox jumped"])
    assert not hit and "".join(deltas) == text


def test_earliest_stop_string_wins(tok: Tokenizer) -> None:
    ids = tok.encode(" one two three four", add_special_tokens=False)
    deltas, hit, _ = stream(tok, ids, stop=["four", "two"])
    assert hit and "".join(deltas) == " one "


def test_skip_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode(" a b", add_special_tokens=False) + [tok.eos_token_id]
    deltas, _, _ = stream(tok, ids)
    assert "".join(deltas) == " a b"
