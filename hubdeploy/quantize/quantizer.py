"""`quantize_model`: a 16-bit Hub checkpoint -> an AutoAWQ-GEMM checkpoint, layer by layer.

For AWQ, the calibration blocks are embedded once, then each decoder layer is read from the
safetensors files, run on the current hidden states (float32) to record its linears' inputs,
searched, quantized, written as its own shard, and its 16-bit output becomes the next layer's
input (as AutoAWQ: the next layer sees the unquantized layer's output). So memory holds one
layer plus the calibration activations. The hidden states are saved with each layer, so an
interrupted run resumes after its last finished layer.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from hubdeploy.quantize.calibration import calibration_blocks, calibration_name
from hubdeploy.quantize.checkpoint import CheckpointWriter
from hubdeploy.quantize.decoder import layer_forward
from hubdeploy.quantize.errors import MissingFiles, NoSpace, QuantizeError, UnsupportedArchitecture
from hubdeploy.quantize.layer_quant import AwqLayer, pack_layer, to_float16
from hubdeploy.quantize.settings import SUPPORTED_GROUP_SIZES, QuantizeProgress, QuantizeResult, QuantizeSettings
from hubdeploy.quantize.source import SourceCheckpoint, mlp_names

HIDDEN_STATES = "calibration-hidden.pt"  # the next layer's input, kept for resuming
SPACE_MARGIN = 1.05


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def quantization_config(family: str, group_size: int) -> dict:
    """`config.json`'s `quantization_config` as AutoAWQ 0.2.9 writes it (`to_transformers_dict`).

    `modules_to_not_convert`: AutoAWQ's Mixtral has `["gate"]`; for Qwen3-MoE we keep the
    router (`mlp.gate`) 16-bit too and say so (AutoAWQ would list nothing and quantize it;
    "gate" alone would also match `gate_proj`); Llama-family models have no router: None.
    """
    skip = {"mixtral": ["gate"], "qwen3_moe": ["mlp.gate"]}.get(family)
    return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4,
            "version": "gemm", "modules_to_not_convert": skip}


def _check_shapes(source: SourceCheckpoint, group_size: int) -> None:
    shapes = [(i, n, source.tensors[source.layer_prefix(i) + n + ".weight"].shape)
              for i in range(source.num_layers) for n in source.linear_names(i)]
    for i, n, (out_f, in_f) in shapes:
        if out_f % 8:
            raise UnsupportedArchitecture(f"{n} of layer {i} has {out_f} outputs: AWQ GEMM packs 8 per int32")
        if in_f % group_size:
            fits = [g for g in SUPPORTED_GROUP_SIZES if all(s[1] % g == 0 for _, _, s in shapes)]
            hint = f"use --group-size {' or '.join(map(str, fits))}" if fits else "no supported group size fits"
            raise QuantizeError(f"{n} of layer {i} has {in_f} inputs, not a multiple of the group size "
                                f"{group_size}: {hint}")


def quantize_model(
    src: Path,
    out: Path,
    settings: QuantizeSettings = QuantizeSettings(),
    on_progress: Callable[[QuantizeProgress], None] | None = None,
    *,
    free_bytes: Callable[[Path], int] = disk_free,
    device: torch.device | str | None = None,
) -> QuantizeResult:
    """Quantize the local snapshot `src` into `out` (see the module docstring).

    `free_bytes(out)` is the free-space probe (checked against the expected output size
    before anything is written); `device` defaults to CUDA when available.
    """
    t0 = time.monotonic()
    settings.validate()
    source = SourceCheckpoint(Path(src))
    _check_shapes(source, settings.group_size)
    if settings.method == "awq" and not (source.dir / "tokenizer.json").is_file():
        raise MissingFiles(f"{source.dir} has no tokenizer.json: AWQ calibration needs the model's fast tokenizer")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = source.num_layers
    calib = calibration_name(settings.calib) if settings.method == "awq" else "none (round-to-nearest)"
    writer = CheckpointWriter(Path(out), settings.key(), n, {**asdict(settings), "calibration": calib})

    def report(stage: str) -> None:
        if on_progress is not None:
            on_progress(QuantizeProgress(len(writer.done), n, writer.bytes_written, stage))

    if writer.is_complete():
        report("done")
        return QuantizeResult(Path(out), calib, n, time.monotonic() - t0, writer.disk_bytes())
    needed = int(source.expected_output_bytes(settings.group_size) * SPACE_MARGIN)
    free = free_bytes(Path(out))
    if free < needed:
        raise NoSpace(f"{out} has {free / 2**30:.2f} GiB free but the quantized checkpoint needs about "
                      f"{needed / 2**30:.2f} GiB: free some space or choose another output directory")
    writer.open()
    hidden_path = Path(out) / HIDDEN_STATES
    x = cos_sin = None
    if settings.method == "awq":
        report("calibrating")
        x, cos_sin = _calibration_inputs(source, settings, writer, hidden_path, dev)
    report("layer")
    skip = quantization_config(source.cfg.family, settings.group_size)["modules_to_not_convert"] or []
    for i in range(n):
        if i in writer.done:
            continue
        tensors = {k: v.to(dev, torch.float32) for k, v in source.layer_tensors(i).items()}
        prefix = source.layer_prefix(i)
        # what every AWQ loader will expect packed: modules_to_not_convert is a substring rule
        linears = [m for m in source.linear_names(i) if not any(k in prefix + m for k in skip)]
        if settings.method == "awq":
            names = mlp_names(source.cfg, i)
            with torch.no_grad():
                trace = layer_forward(x, tensors, source.cfg, names, cos_sin)
                AwqLayer(tensors, trace, source.cfg, names, cos_sin, settings.group_size).run()
            x = trace.out
            del trace
        packed = pack_layer(tensors, linears, settings.group_size)
        del tensors
        if x is not None:
            _save_hidden(hidden_path, x, i)
        writer.write_layer(i, {prefix + k: v.cpu() for k, v in packed.items()})
        report("layer")
    report("writing")
    config = dict(source.raw_config)
    config["quantization_config"] = quantization_config(source.cfg.family, settings.group_size)
    config["torch_dtype"] = "float16"
    writer.finish({k: to_float16(v) for k, v in source.other_tensors().items()}, config, source.dir)
    hidden_path.unlink(missing_ok=True)
    report("done")
    return QuantizeResult(Path(out), calib, n, time.monotonic() - t0, writer.bytes_written)


def _save_hidden(path: Path, x: torch.Tensor, layer: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"after_layer": layer, "x": x.cpu()}, tmp)
    tmp.replace(path)


def _calibration_inputs(source: SourceCheckpoint, settings: QuantizeSettings, writer: CheckpointWriter,
                        hidden_path: Path, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first unfinished layer's input (embedded calibration blocks, or the saved state)."""
    from hubdeploy.kernels.norm_rope_act import rotary_cos_sin
    from hubdeploy.serving.tokenizer import load_tokenizer

    cfg = source.cfg
    resume_from = min(set(range(source.num_layers)) - writer.done, default=source.num_layers)
    if resume_from > 0 and hidden_path.is_file():
        saved = torch.load(hidden_path, map_location="cpu", weights_only=True)
        if int(saved["after_layer"]) == resume_from - 1:
            x = saved["x"].to(dev)
            return x, rotary_cos_sin(cfg.head_dim, x.shape[1], cfg.rope_theta, cfg.rope_scaling).to(dev)
    if resume_from > 0:  # hidden states lost: redo the finished layers to recompute them
        writer.restart()
    tok = load_tokenizer(source.dir)
    ids = calibration_blocks(tok.encode, settings.calib, settings.n_samples, settings.seq_len)
    embed = source.tensor("model.embed_tokens.weight").to(dev, torch.float32)
    x = embed[ids.to(dev)]
    del embed
    return x, rotary_cos_sin(cfg.head_dim, x.shape[1], cfg.rope_theta, cfg.rope_scaling).to(dev)


__all__ = ["disk_free", "quantization_config", "quantize_model"]
