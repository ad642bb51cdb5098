"""Calibration text: the set shipped with the package or the user's file, cut into token blocks.

The shipped set (`calib/hubdeploy-calib-v1.txt`) was written for hubdeploy and is released
under CC0: prose, dialogue, code, data, numbers and a few non-English lines, so that the
activation statistics AWQ scales by are not those of one kind of text. Nothing is downloaded.
Documents are the file's paragraphs (plain text, separated by blank lines) or the `"text"`
field of each line (.jsonl); each is tokenized with the model's BOS, all are concatenated and
cut into blocks of `seq_len` tokens, as AutoAWQ's `get_calib_dataset` does.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from hubdeploy.quantize.errors import MissingFiles, QuantizeError

SHIPPED_NAME = "hubdeploy-calib-v1"
SHIPPED_PATH = Path(__file__).with_name("calib") / f"{SHIPPED_NAME}.txt"


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def calibration_digest(calib: Path | None) -> str:
    """Content hash of the calibration text (the shipped one when `calib` is None)."""
    return _file_sha(Path(calib) if calib is not None else SHIPPED_PATH)


def calibration_name(calib: Path | None) -> str:
    """What the report shows: the shipped set's name, or the file's name with its hash."""
    if calib is None:
        return SHIPPED_NAME
    return f"{Path(calib).name} (sha256 {calibration_digest(calib)[:12]})"


def read_documents(calib: Path | None) -> list[str]:
    """The calibration documents: paragraphs of a text file or `"text"` of each .jsonl line."""
    path = Path(calib) if calib is not None else SHIPPED_PATH
    if not path.is_file():
        raise MissingFiles(f"calibration file {path} not found: pass an existing .txt or .jsonl file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuantizeError(f"{path} line {n} is not JSON ({e}); a .jsonl needs one object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise QuantizeError(f'{path} line {n} has no "text" string; each line needs {{"text": "..."}}')
            docs.append(row["text"])
    else:
        docs = [p.strip() for p in text.split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise QuantizeError(f"{path} holds no text: give a calibration file with some text in it")
    return docs


def calibration_blocks(encode, calib: Path | None, n_samples: int, seq_len: int) -> torch.Tensor:
    """Token ids `[blocks, seq_len]` (int64): at most `n_samples` blocks.

    `encode(text) -> list[int]` is the model's tokenizer with special tokens. A text shorter
    than one block gives a single shorter block.
    """
    ids: list[int] = []
    for doc in read_documents(calib):
        ids += encode(doc)
        if len(ids) >= n_samples * seq_len:
            break
    if len(ids) < seq_len:
        return torch.tensor([ids], dtype=torch.long)
    n = min(n_samples, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


__all__ = ["SHIPPED_NAME", "SHIPPED_PATH", "calibration_blocks", "calibration_digest", "calibration_name", "read_documents"]
