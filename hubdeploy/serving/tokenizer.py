"""Tokenizer loading (fast `tokenizer.json` only, never remote code) and incremental
detokenization with stop strings.

`IncrementalDetokenizer` turns the token stream into text deltas that never contain a
broken UTF-8 character and never contain any part of a stop string: text that could still
become the start of a stop string is held back, and a completed stop string is cut
together with everything after it.

UTF-8 hold-back is exact where the raw bytes of tokens are knowable (byte-level BPE:
GPT-2, Llama-3, Qwen and our tiny models; SentencePiece byte fallback `<0xE2>`: Llama-2,
Mistral): bytes that may still complete a character wait, bytes that never can are
emitted at once as U+FFFD, as a full decode renders them (one ByteFallback nuance: see
`IncrementalDetokenizer`). Otherwise the old rule (wait while the decoded window ends
with U+FFFD) applies, bounded to 4 tokens.
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
        """Token ids of `text`. Through `encode_batch`, which (unlike `encode`) releases the GIL
        while it works, so a long prompt tokenized on a worker thread leaves the server's event
        loop running; the ids are the same."""
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

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


# ---- raw bytes of tokens ------------------------------------------------------------

BYTE_LEVEL = "byte_level"  # GPT-2 byte-to-unicode alphabet (Llama-3, Qwen, our tiny models)
BYTE_FALLBACK = "byte_fallback"  # SentencePiece byte tokens "<0xE2>" (Llama-2, Mistral, Mixtral)
UTF8_MAX_BYTES = 4

# Allowed range of the byte after a lead byte (Unicode table 3-7); other leads take 80..BF.
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, as byte-level BPE uses it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in bytes_to_unicode().items()}


def utf8_incomplete_tail(data: bytes) -> int:
    """Where a trailing, still completable UTF-8 character starts in `data` (len(data) if none).

    Everything before the returned index decodes the same whatever bytes follow (the tail
    starts with a lead byte, which no earlier sequence can absorb); the tail is a valid lead
    byte with fewer continuation bytes than it needs, so it must wait. An invalid lead,
    an unexpected continuation or an out-of-range second byte is not a tail: a full decode
    renders it as U+FFFD whatever follows.
    """
    n = len(data)
    for i in range(n - 1, max(n - UTF8_MAX_BYTES, -1), -1):
        b = data[i]
        if b < 0x80:
            return n
        if b < 0xC0:
            continue  # continuation byte: look further back for its lead
        if b < 0xC2 or b > 0xF4:
            return n  # C0, C1, F5..FF can never start a character
        need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
        if n - i >= need:
            return n  # complete, or already broken: nothing to wait for
        if n - i >= 2:
            lo, hi = _SECOND_BYTE.get(b, (0x80, 0xBF))
            if not lo <= data[i + 1] <= hi:
                return n
        return i
    return n


def _decoder_types(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["type"]] if isinstance(node.get("type"), str) else []
        for v in node.values():
            out += _decoder_types(v)
        return out
    if isinstance(node, list):
        return [t for v in node for t in _decoder_types(v)]
    return []


def decoder_scheme(tok: _HFTokenizer) -> str | None:
    """How token bytes are knowable, read from tokenizer.json's decoder (None: not knowable)."""
    if tok.decoder is None:
        return None
    try:
        types = _decoder_types(json.loads(tok.decoder.__getstate__()))
    except (ValueError, TypeError, AttributeError):
        return None
    if "ByteLevel" in types and all(t in ("ByteLevel", "Sequence") for t in types):
        return BYTE_LEVEL
    if "ByteFallback" in types:
        return BYTE_FALLBACK
    return None


class TokenBytes:
    """Per-tokenizer cache of each token id's raw bytes, filled lazily (one dict hit per token)."""

    def __init__(self, tok: _HFTokenizer) -> None:
        self._tok = tok
        self.scheme = decoder_scheme(tok)
        self.special: frozenset[int] = frozenset(
            i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        self._level: dict[int, bytes] = {}
        self._fallback: dict[int, int | None] = {}

    def level_bytes(self, token_id: int) -> bytes:
        """Bytes a ByteLevel decoder produces for the token (checked against a one-token decode)."""
        b = self._level.get(token_id)
        if b is None:
            piece = self._tok.id_to_token(token_id) or ""
            mapped = [_UNICODE_TO_BYTE.get(c) for c in piece]
            # tokenizers' ByteLevel decoder: all characters mapped, else the token's own UTF-8
            b = bytes(mapped) if None not in mapped else piece.encode("utf-8")  # type: ignore[arg-type]
            shown = self._tok.decode([token_id], skip_special_tokens=False)
            if b.decode("utf-8", "replace") != shown:
                b = shown.encode("utf-8")  # not the ByteLevel rule after all: trust the decoder
            self._level[token_id] = b
        return b

    def fallback_byte(self, token_id: int) -> int | None:
        """The byte of a "<0xNN>" byte-fallback token, None for any other token."""
        if token_id in self._fallback:
            return self._fallback[token_id]
        piece = self._tok.id_to_token(token_id) or ""
        val: int | None = None
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                val = int(piece[3:5], 16)
            except ValueError:
                val = None
        self._fallback[token_id] = val
        return val


def token_bytes(tokenizer: Tokenizer) -> TokenBytes:
    """The shared byte cache of a tokenizer (built on first use, reused by every request)."""
    tb = tokenizer.__dict__.get("_token_bytes")
    if tb is None:
        tb = TokenBytes(tokenizer._tok)
        tokenizer.__dict__["_token_bytes"] = tb
    return tb


class IncrementalDetokenizer:
    """Text deltas of a growing output, safe for UTF-8 and stop strings.

    Byte-level tokenizers are decoded byte-exactly with no window: the text is the lossy
    UTF-8 decode of the concatenated token bytes, minus a trailing unfinished character.
    Other tokenizers decode a short window of tokens (a few before the last emitted one)
    as vLLM does, so spacing rules of the decoder apply as in a full decode; byte-fallback
    runs are tracked byte by byte to know exactly when to wait.

    One deliberate difference from `Tokenizer.decode`: tokenizers' ByteFallback shows a
    run of byte tokens as one U+FFFD per byte as soon as any byte in it is invalid, even
    characters before it. Those characters stream when their last byte arrives (a CJK or
    emoji run in Llama-2/Mistral output must not wait for the run to end), so they stay;
    the rest of such a run is one U+FFFD per byte token, as tokenizers shows it.
    """

    PREFIX_WINDOW = 6

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self._bytes = token_bytes(tokenizer)
        self.scheme = self._bytes.scheme
        ctx = list(prompt_token_ids[-self.PREFIX_WINDOW:])
        if self.scheme == BYTE_FALLBACK:
            while ctx and self._bytes.fallback_byte(ctx[-1]) is not None:
                ctx.pop()  # a byte run must not start in the prompt: the output decodes on its own
        self.ids: list[int] = ctx  # context tokens + output tokens
        self.prefix_offset = 0
        self.read_offset = len(ctx)
        self.decoded = ""  # all output text decoded so far (complete characters only)
        self.emitted = 0  # chars of `decoded` handed out
        self.stopped = False
        self._pending = b""  # byte-level: bytes of a character still completing
        self._run = bytearray()  # byte fallback: the trailing run of byte tokens
        self._run_done = 0  # bytes of `_run` that form complete characters
        self._run_valid = True  # `_run` is a UTF-8 prefix (an invalid run never recovers)
        self._run_last = 0  # index in `ids` of the last byte token

    # -- UTF-8 ----------------------------------------------------------------------------

    def _decode_new(self, token_id: int | None, flush: bool) -> str:
        if token_id is not None:
            self.ids.append(int(token_id))
        if self.scheme == BYTE_LEVEL:
            return self._new_byte_level(token_id, flush)
        if self.scheme == BYTE_FALLBACK:
            return self._new_byte_fallback(token_id, flush)
        return self._new_window(flush, bounded=True)

    def _skipped(self, token_id: int) -> bool:
        return self.skip_special_tokens and token_id in self._bytes.special

    def _new_byte_level(self, token_id: int | None, flush: bool) -> str:
        text = ""
        if token_id is not None and not self._skipped(token_id):
            b = self._bytes.level_bytes(token_id)
            data = self._pending + b if self._pending else b
            cut = utf8_incomplete_tail(data)
            self._pending = data[cut:]
            text = data[:cut].decode("utf-8", "replace")
        if flush:
            self._pending = b""  # an output cut mid-character loses the stub
        self.read_offset = len(self.ids)
        return text

    def _new_byte_fallback(self, token_id: int | None, flush: bool) -> str:
        # Text comes from the decode window (spacing rules apply); bytes decide when. A
        # character streams on the byte token that completes it, an unfinished one waits,
        # bytes that can never complete stream at once as U+FFFD, one per byte token.
        n = len(self.ids)
        if token_id is not None and not self._skipped(token_id):
            b = self._bytes.fallback_byte(token_id)
            if b is None:  # a word token ends the run
                stub = len(self._run) - self._run_done if self._run_valid else 0
                text = ""
                if stub and self._run_done:
                    # Characters of this run already streamed: its unfinished tail shows one
                    # U+FFFD per byte (tokenizers' ByteFallback would redo the whole run so).
                    text = REPLACEMENT_CHAR * stub
                    self.prefix_offset, self.read_offset = self._run_last, n - 1
                self._reset_run()
                return text + self._new_window(flush=False, bounded=False)
            self._run_last = n - 1
            if self._run and not self._run_valid:
                self._run.append(b)
                self.prefix_offset, self.read_offset = n - 1, n
                return REPLACEMENT_CHAR  # a broken run stays broken: one U+FFFD per byte
            done = self._run_done
            self._run.append(b)
            self._run_valid = self._extend_run()
            if not self._run_valid and done:
                self.prefix_offset, self.read_offset = n - 1, n
                return REPLACEMENT_CHAR * (len(self._run) - done)
            # broken before any character of it streamed: the window renders it exactly
        if self._run_valid and self._run_done < len(self._run):
            return ""  # a character is still completing (at flush: the stub is dropped)
        return self._new_window(flush=False, bounded=False)

    def _reset_run(self) -> None:
        self._run.clear()
        self._run_done = 0
        self._run_valid = True

    def _extend_run(self) -> bool:
        seg = bytes(self._run[self._run_done:])
        cut = utf8_incomplete_tail(seg)
        try:
            seg[:cut].decode("utf-8")
        except UnicodeDecodeError:
            return False
        self._run_done += cut
        return True

    def _new_window(self, flush: bool, bounded: bool) -> str:
        decode = self.tok.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) <= len(prefix):
            return ""
        keep = len(prefix)  # `full` is final up to here
        if bounded and full.endswith(REPLACEMENT_CHAR):
            # Bytes unknown: a character may be split across tokens. It has at most 4 bytes
            # and each token carries one or more, so what a token rendered is final once 4
            # more tokens came: emit up to the last 4 tokens, whose bytes may still complete.
            waited = len(self.ids) - self.read_offset
            if waited > UTF8_MAX_BYTES:
                k = len(self.ids) - UTF8_MAX_BYTES
                head = decode(self.ids[self.prefix_offset:k], self.skip_special_tokens)
                if len(head) > len(prefix) and head.startswith(prefix) and full.startswith(head):
                    if not flush:
                        self.prefix_offset, self.read_offset = self.read_offset, k
                        return head[len(prefix):]
                    keep = len(head)
                elif not flush and waited <= 2 * UTF8_MAX_BYTES:
                    return ""
                # else: a decoder that keeps rewriting its tail; stop waiting altogether
            elif not flush:
                return ""
        new = full[len(prefix):]
        if flush:  # an output cut mid-character loses the stub
            new = full[len(prefix):keep] + full[keep:].rstrip(REPLACEMENT_CHAR)
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new

    # -- stop strings ---------------------------------------------------------------------


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
        old_len = len(self.decoded)
        self.decoded += self._decode_new(token_id, flush=finished)
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
