"""Test helpers for the quantizer: how close a quantized checkpoint is to its 16-bit source.

Closeness is the mean KL divergence KL(P_16bit || P_quantized) of the next-token
distributions at every position of held-out token blocks, both models run by transformers
in float32 (the quantized one through its dequantized weights, `dequantized_copy`).
"""
from __future__ import annotations

from pathlib import Path

import torch



@torch.no_grad()
def full_logits(model_dir: Path, blocks: torch.Tensor) -> torch.Tensor:
    """transformers' logits `[B, L, V]` (float32) of a plain (unquantized) checkpoint."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return hf(blocks).logits.float()


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(logits))."""
    p = torch.log_softmax(ref_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def held_out_blocks(model_dir: Path, seq_len: int = 48, n: int = 8) -> torch.Tensor:
    """Token blocks of text that no calibration set here contains (the tiny tokenizer's corpus)."""
    from hubdeploy.quantize.calibration import calibration_blocks
    from hubdeploy.serving.tiny.tokenizer import CORPUS
    from hubdeploy.serving.tokenizer import load_tokenizer

    path = Path(model_dir).parent / "held-out.txt"
    path.write_text(CORPUS)
    return calibration_blocks(load_tokenizer(model_dir).encode, path, n, seq_len)


def add_outlier_channels(model_dir: Path, channels: tuple[int, ...] = (3, 17, 40, 58), factor: float = 12.0) -> Path:
    """Give a tiny random model the outlier activation channels real LLMs have: a few hidden
    channels of every RMSNorm weight (input and post-attention) multiplied by `factor`.

    Random tiny models have flat activations, where activation-aware scaling has little to
    find; with outliers, AWQ's gain over round-to-nearest shows clearly, as it does on real
    models. Rewrites `model.safetensors` in place (fp16, same names).
    """
    from safetensors.torch import load_file, save_file

    path = Path(model_dir) / "model.safetensors"
    sd = load_file(str(path))
    for name, t in sd.items():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            t = t.float()
            t[list(channels)] *= factor
            sd[name] = t.half()
    save_file(sd, str(path), metadata={"format": "pt"})
    return Path(model_dir)
