"""The output directory: one safetensors shard per decoder layer, resumable, finished last.

Layout: `model-000NN-of-000MM.safetensors` (shard i = decoder layer i, the last shard the
embeddings, final norm and lm_head), `model.safetensors.index.json`, the tokenizer / card /
generation-config files copied from the source, and `config.json` with AutoAWQ's
`quantization_config`. `hubdeploy-quantize.json` (the run manifest) records the settings key
and the layers finished; every file is written under a temporary name and renamed, and
`config.json` is written last, so a directory with a `config.json` is a complete checkpoint
and one without is an interrupted run: same key -> its finished layers are kept; another
key -> it is emptied and started again.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hubdeploy.quantize.errors import QuantizeError

MANIFEST = "hubdeploy-quantize.json"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "generation_config.json", "chat_template.jinja", "chat_template.json", "README.md",
                "vocab.json", "merges.txt", "added_tokens.json", "LICENSE", "NOTICE")


def shard_name(i: int, total: int) -> str:
    return f"model-{i + 1:05d}-of-{total:05d}.safetensors"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointWriter:
    """Writes a quantized checkpoint into `out`, resuming a run with the same settings key."""

    def __init__(self, out: Path, key: str, num_layers: int, settings: dict[str, Any]) -> None:
        self.out, self.key, self.num_layers = Path(out), key, num_layers
        self.total = num_layers + 1
        self.settings = settings
        self.weight_map: dict[str, str] = {}
        self.done: set[int] = set()
        self.bytes_written = 0

    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST

    def is_complete(self) -> bool:
        """A finished checkpoint of these settings is already there."""
        m = self._manifest()
        return bool(m and m.get("key") == self.key and m.get("complete") and (self.out / "config.json").is_file())

    def _manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def open(self) -> None:
        """Create `out`, or resume the interrupted run of these settings there, or empty it."""
        if self.out.exists() and not self.out.is_dir():
            raise QuantizeError(f"{self.out} exists and is not a directory: choose another output path")
        self.out.mkdir(parents=True, exist_ok=True)
        m = self._manifest()
        if m is None:
            if any(self.out.iterdir()):
                raise QuantizeError(f"{self.out} is not empty and holds no hubdeploy quantize run: "
                                    "choose an empty or new output directory")
        elif m.get("key") != self.key or m.get("complete"):
            self._clear()
        else:
            for i in map(int, m.get("done", [])):
                shard = self.out / shard_name(i, self.total)
                if shard.is_file():
                    self.done.add(i)
                    self.weight_map.update({k: shard.name for k in m.get("tensors", {}).get(str(i), [])})
                    self.bytes_written += shard.stat().st_size
        self._save_manifest(complete=False)

    def restart(self) -> None:
        """Forget the finished layers (their shards get rewritten)."""
        self.done.clear()
        self.weight_map.clear()
        self.bytes_written = 0
        self._save_manifest(complete=False)

    def disk_bytes(self) -> int:
        """Size of the weight shards in `out`."""
        return sum(p.stat().st_size for p in self.out.glob("model-*.safetensors"))

    def _clear(self) -> None:
        for p in self.out.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def _save_manifest(self, complete: bool) -> None:
        tensors: dict[str, list[str]] = {}
        for k, f in self.weight_map.items():
            i = int(f.split("-")[1]) - 1
            tensors.setdefault(str(i), []).append(k)
        _atomic_write_text(self.manifest_path, json.dumps(
            {"key": self.key, "settings": self.settings, "done": sorted(self.done), "complete": complete,
             "tensors": tensors}, indent=1, default=str))

    def _write_shard(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.out / shard_name(i, self.total)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates it owner-only; a checkpoint is for reading
        os.replace(tmp, path)
        self.bytes_written += path.stat().st_size
        self.weight_map.update({k: path.name for k in tensors})

    def write_layer(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Decoder layer `i`'s tensors (full names); recorded as done once on disk."""
        self._write_shard(i, tensors)
        self.done.add(i)
        self._save_manifest(complete=False)

    def finish(self, other: dict[str, torch.Tensor], config: dict[str, Any], src: Path) -> None:
        """The non-layer shard, index, copied files, and `config.json` last."""
        self._write_shard(self.num_layers, other)
        index = {"metadata": {"total_size": self.bytes_written}, "weight_map": dict(sorted(self.weight_map.items()))}
        _atomic_write_text(self.out / "model.safetensors.index.json", json.dumps(index, indent=2))
        for name in COPIED_FILES:
            if (Path(src) / name).is_file():
                tmp = self.out / (name + ".tmp")
                shutil.copyfile(Path(src) / name, tmp)
                os.replace(tmp, self.out / name)
        self._save_manifest(complete=True)
        _atomic_write_text(self.out / "config.json", json.dumps(config, indent=2) + "\n")


__all__ = ["COPIED_FILES", "CheckpointWriter", "MANIFEST", "shard_name"]
