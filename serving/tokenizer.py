"""Tokenizer loading (fast `tokenizer.json` only, never remote code) and incremental
detokenization with stop strings.

`IncrementalDetokenizer` turns the token stream into text deltas that never contain a
broken UTF-8 character (a byte-level token that ends mid-character is held until the
character completes) and never contain any part of a stop string: text that could still
become the start of a stop string is held back, and a completed stop string is cut
together with everything after it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

REPLACEMENT_CHAR = "\ufffd"


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from e


class Tokenizer:
    """A Hub fast tokenizer: `tokenizer.json` + `tokenizer_config.json` (+ generation_config.json)."""

    def __init__(self, tok: _HFTokenizer, config: dict[str, Any], extra_eos_ids: list[int] | None = None) -> None:
        self._tok = tok
        self.config = config
        self.chat_template: str | None = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.pad_token = _token_str(config.get("pad_token"))
        self.unk_token = _token_str(config.get("unk_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        eos: list[int] = [] if self.eos_token_id is None else [self.eos_token_id]
        for t in extra_eos_ids or []:
            if t not in eos:
                eos.append(int(t))
        self.eos_token_ids: list[int] = eos
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def special_tokens(self) -> dict[str, str | None]:
        """The named special tokens, as chat templates expect them (`bos_token=...`)."""
        return {"bos_token": self.bos_token, "eos_token": self.eos_token,
                "pad_token": self.pad_token, "unk_token": self.unk_token}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Load the fast tokenizer of a model directory in Hub layout."""
    d = Path(model_dir)
    path = d / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the engine needs a fast tokenizer (tokenizer.json); "
            "convert a slow tokenizer with transformers' AutoTokenizer(...).save_pretrained()"
        )
    tok = _HFTokenizer.from_file(str(path))
    config = _read_json(d / "tokenizer_config.json")
    extra: list[int] = []
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(d / name).get("eos_token_id")
        extra += [eos] if isinstance(eos, int) else list(eos or [])
    return Tokenizer(tok, config, extra)


class IncrementalDetokenizer:
    """Text deltas of a growing output, safe for UTF-8 and stop strings.

    Decoding works on a short window of tokens (a few before the last emitted one) as
    vLLM does, so spacing rules of the decoder apply as in a full decode.
    """

    PREFIX_WINDOW = 6

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        ctx = list(prompt_token_ids[-self.PREFIX_WINDOW:])
        self.ids: list[int] = ctx  # context tokens + output tokens
        self.prefix_offset = 0
        self.read_offset = len(ctx)
        self.decoded = ""  # all output text decoded so far (complete characters only)
        self.emitted = 0  # chars of `decoded` handed out
        self.stopped = False

    def _decode_new(self, flush: bool) -> str:
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) <= len(prefix):
            return ""
        if full.endswith(REPLACEMENT_CHAR) and not flush:
            return ""  # a character is split across tokens: wait for the rest
        new = full[len(prefix):]
        if flush:
            new = new.rstrip(REPLACEMENT_CHAR)  # an output cut mid-character loses the stub
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def add(self, token_id: int | None, finished: bool = False) -> tuple[str, bool]:
        """Feed one output token (None: just flush). Returns (delta text, stop string hit)."""
        if self.stopped:
            return "", True
        if token_id is not None:
            self.ids.append(int(token_id))
        old_len = len(self.decoded)
        self.decoded += self._decode_new(flush=finished)
        if self.stop:
            start = max(0, old_len - max(len(s) for s in self.stop) + 1)
            hit = -1
            for s in self.stop:
                i = self.decoded.find(s, start)
                if i != -1 and (hit == -1 or i < hit):
                    hit = i
            if hit != -1:
                self.decoded = self.decoded[:hit]
                self.stopped = True
                return self._emit(len(self.decoded)), True
            if not finished:
                return self._emit(len(self.decoded) - self._holdback(self.decoded)), False
        return self._emit(len(self.decoded)), False

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.decoded[self.emitted:upto]
        self.emitted = upto
        return delta

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return self.decoded[: self.emitted]
