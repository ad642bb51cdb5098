"""The 16-bit source checkpoint, read one decoder layer at a time.

Checks up front what would otherwise fail half-way (architecture, an existing quantization,
missing shards or tokenizer), then hands out each layer's tensors with `safe_open`, so
memory holds one layer, never the model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from hubdeploy.quantize.errors import AlreadyQuantized, MissingFiles, UnsupportedArchitecture
from hubdeploy.serving.config import ConfigError, ModelConfig
from hubdeploy.serving.loader import CheckpointError, TensorInfo, checkpoint_files, read_headers

QUANTIZED_LEAVES = (".qweight", ".qzeros", ".weight_packed", ".weight_scale", ".SCB", ".absmax")


@dataclass(frozen=True)
class MlpNames:
    """Names (relative to the layer) of one layer's MLP: experts as (gate, up, down) triples."""

    router: str | None  # MoE router linear, kept 16-bit; None for a dense MLP
    experts: list[tuple[str, str, str]]


def mlp_names(cfg: ModelConfig, layer: int) -> MlpNames:
    """The MLP's linears in each family's Hub naming (Mixtral w1/w3/w2, the rest gate/up/down)."""
    if cfg.is_moe_layer(layer):
        if cfg.family == "mixtral":
            p = "block_sparse_moe"
            return MlpNames(f"{p}.gate", [(f"{p}.experts.{e}.w1", f"{p}.experts.{e}.w3", f"{p}.experts.{e}.w2")
                                          for e in range(cfg.num_experts)])
        p = "mlp"
        return MlpNames(f"{p}.gate", [(f"{p}.experts.{e}.gate_proj", f"{p}.experts.{e}.up_proj",
                                       f"{p}.experts.{e}.down_proj") for e in range(cfg.num_experts)])
    return MlpNames(None, [("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")])


ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


class SourceCheckpoint:
    """A local Hub-layout 16-bit checkpoint; raises a `QuantizeError` subclass if it cannot be quantized."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise MissingFiles(f"{self.dir} has no config.json: pass a Hub model repo (or its local snapshot)")
        try:
            self.cfg = ModelConfig.from_dir(self.dir)
        except ConfigError as e:
            raise UnsupportedArchitecture(str(e)) from None
        self.raw_config = json.loads((self.dir / "config.json").read_text())
        if self.cfg.quant is not None or self.raw_config.get("quantization_config"):
            method = self.cfg.quant.method if self.cfg.quant else self.raw_config["quantization_config"].get("quant_method")
            raise AlreadyQuantized(
                f"{self.dir} is already quantized ({method}); quantize the 16-bit original instead, "
                "or deploy this checkpoint as it is")
        from hubdeploy.serving.models import check_supported

        try:
            check_supported(self.cfg)
        except ConfigError as e:
            raise UnsupportedArchitecture(f"{e} Quantizing it is not supported either.") from None
        try:
            self.tensors: dict[str, TensorInfo] = read_headers(checkpoint_files(self.dir))
        except CheckpointError as e:
            raise MissingFiles(f"{e}; download the full snapshot again") from None
        packed = [n for n in self.tensors if n.endswith(QUANTIZED_LEAVES)]
        if packed:
            raise AlreadyQuantized(f"{self.dir} holds quantized tensors ({packed[0]}, ...) but no quantization_config; "
                                   "quantize the 16-bit original instead")
        self._check_layer_tensors()

    @property
    def num_layers(self) -> int:
        return self.cfg.num_hidden_layers

    @staticmethod
    def layer_prefix(layer: int) -> str:
        return f"model.layers.{layer}."

    def linear_names(self, layer: int) -> list[str]:
        """The linears AWQ quantizes in `layer` (relative names), in checkpoint order."""
        names = list(ATTENTION_LINEARS)
        for gate, up, down in mlp_names(self.cfg, layer).experts:
            names += [gate, up, down]
        return names

    def _check_layer_tensors(self) -> None:
        missing = [self.layer_prefix(i) + n + ".weight" for i in range(self.num_layers)
                   for n in self.linear_names(i) if self.layer_prefix(i) + n + ".weight" not in self.tensors]
        if missing:
            raise MissingFiles(f"{self.dir}: {len(missing)} weight(s) missing, e.g. {missing[0]}; "
                               "the checkpoint is incomplete or not in its family's Hub naming")

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """Every tensor of decoder layer `layer`, keyed by its name relative to the layer."""
        p = self.layer_prefix(layer)
        return {k[len(p):]: v for k, v in self._read([n for n in self.tensors if n.startswith(p)]).items()}

    def other_tensors(self) -> dict[str, torch.Tensor]:
        """Embeddings, final norm, lm_head: everything outside the decoder layers (kept 16-bit)."""
        return self._read([n for n in self.tensors if not n.startswith("model.layers.")])

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise MissingFiles(f"{self.dir}: tensor {name} not found in the checkpoint")
        return self._read([name])[name]

    def expected_output_bytes(self, group_size: int) -> int:
        """Size of the AWQ checkpoint this source becomes (4-bit linears, the rest 16-bit)."""
        quantized = {self.layer_prefix(i) + n + ".weight" for i in range(self.num_layers) for n in self.linear_names(i)}
        total = 0
        for name, info in self.tensors.items():
            numel = 1
            for d in info.shape:
                numel *= d
            if name in quantized:
                out_f, in_f = info.shape
                total += numel // 2 + (in_f // group_size) * out_f * 5 // 2  # int4 + fp16 scales + int4 zeros
            else:
                total += numel * 2
        return total


__all__ = ["ATTENTION_LINEARS", "MlpNames", "SourceCheckpoint", "mlp_names"]
