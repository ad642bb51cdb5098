"""A Mixtral-shaped model of realistic proportions for the CPU benchmarks, random weights.

    python -m benchmarks.realistic_mixtral OUT_DIR [--awq OUT_AWQ_DIR] [--tokenizer-model PATH]

Shape (why): hidden 1024 and, in Mixtral-8x7B's proportions, expert intermediate 3584 (3.5x
hidden), head_dim 128 (8 query heads, 2 KV heads: Mixtral's 4:1 GQA), 8 experts top-2, vocab
32000 with the real Mixtral tokenizer. 8 layers: the lm_head (kept 16-bit in AWQ checkpoints)
is then 14% of the weights a token reads in bf16, 4 layers would make it 25% (Mixtral-8x7B: 1%),
which would cap any int4 gain by the lm_head rather than by the layers. ~0.8B parameters
(1.6 GB bf16). `--awq` also writes an AutoAWQ-GEMM copy (group 128, zero points, lm_head and
routers plain, as Hub Mixtral AWQ repos are).

The tokenizer: SentencePiece `tokenizer.model.v1` from the `mistral-common` wheel (Mixtral's),
converted to `tokenizer.json` by transformers (needs `sentencepiece` and `protobuf`), and
checked against SentencePiece itself on a few texts before anything is written.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from hubdeploy.kernels.awq_format import awq_quantize

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_local_experts=8,
             num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
AWQ_GROUP = 128
CHECK_TEXTS = ["Hello world", " leading space", "Ünïcödé 日本語 🙂 tabs\tand\nnewlines",
               "def f(x):\n    return x**2  # code", "  double  spaces  ", "1234567890 3.14159"]


def find_tokenizer_model() -> Path:
    """`tokenizer.model.v1` from an installed or downloaded `mistral-common` wheel."""
    try:
        import mistral_common

        p = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        if p.is_file():
            return p
    except ImportError:
        pass
    import subprocess
    import sys
    import zipfile

    d = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(d), "mistral-common"],
                   check=True)
    whl = next(d.glob("mistral_common-*.whl"))
    with zipfile.ZipFile(whl) as z:
        z.extract("mistral_common/data/tokenizer.model.v1", d)
    return d / "mistral_common" / "data" / "tokenizer.model.v1"


def write_tokenizer(spm_model: Path, out: Path) -> None:
    import sentencepiece as spm
    import transformers
    from tokenizers import processors

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(spm_model, Path(tmp) / "tokenizer.model")
        tok = transformers.AutoTokenizer.from_pretrained(tmp)  # converts with sentencepiece + protobuf
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    if len(tok) != sp.vocab_size() or any(tok.encode(t, add_special_tokens=False) != sp.encode(t) for t in CHECK_TEXTS):
        raise SystemExit(f"converted tokenizer disagrees with sentencepiece ({len(tok)} tokens); "
                         "pip install sentencepiece protobuf")
    tok.save_pretrained(out)
    # Mixtral's tokenizer adds <s> (add_bos_token): a TemplateProcessing as Hub Mixtral's tokenizer.json
    tj = json.loads((out / "tokenizer.json").read_text())
    tj["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]).__getstate__())
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True, add_eos_token=False)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def build(out: Path, awq_out: Path | None, spm_model: Path, seed: int = 0) -> None:
    from transformers import MixtralConfig

    c = SHAPE
    H, I, E, L = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["num_hidden_layers"]
    q_out, kv_out = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(c["vocab_size"], H),
                                   "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
                                   "lm_head.weight": rnd(c["vocab_size"], H)}
    for i in range(L):
        p = f"model.layers.{i}"
        sd.update({f"{p}.input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                   f"{p}.post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
                   f"{p}.self_attn.q_proj.weight": rnd(q_out, H), f"{p}.self_attn.k_proj.weight": rnd(kv_out, H),
                   f"{p}.self_attn.v_proj.weight": rnd(kv_out, H), f"{p}.self_attn.o_proj.weight": rnd(H, q_out),
                   f"{p}.block_sparse_moe.gate.weight": rnd(E, H)})
        for e in range(E):
            q = f"{p}.block_sparse_moe.experts.{e}"
            sd.update({f"{q}.w1.weight": rnd(I, H), f"{q}.w3.weight": rnd(I, H), f"{q}.w2.weight": rnd(H, I)})
    tok_dir = Path(tempfile.mkdtemp())
    write_tokenizer(spm_model, tok_dir)
    cfg = MixtralConfig(**c).to_dict()
    cfg.update(architectures=["MixtralForCausalLM"], torch_dtype="bfloat16")
    _write(out, sd, cfg, tok_dir)
    if awq_out is not None:
        q_sd: dict[str, torch.Tensor] = {}
        for name, t in sd.items():
            mod = name[: -len(".weight")]
            if t.dim() == 2 and (".experts." in name or ".self_attn." in name):
                qw, qz, s = awq_quantize(t.float(), AWQ_GROUP)
                q_sd[mod + ".qweight"], q_sd[mod + ".qzeros"], q_sd[mod + ".scales"] = qw, qz, s
            else:
                q_sd[name] = t.to(torch.float16)
        cfg = dict(cfg, torch_dtype="float16", quantization_config={
            "quant_method": "awq", "bits": 4, "group_size": AWQ_GROUP, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": ["gate"]})
        _write(awq_out, q_sd, cfg, tok_dir)
    shutil.rmtree(tok_dir)


def _write(out: Path, sd: dict[str, torch.Tensor], cfg: dict, tok_dir: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    for f in tok_dir.iterdir():
        shutil.copy(f, tmp / f.name)
    tmp.rename(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--awq", type=Path, default=None, help="also write an AutoAWQ copy here")
    ap.add_argument("--tokenizer-model", type=Path, default=None, help="SentencePiece tokenizer.model.v1")
    a = ap.parse_args()
    build(a.out, a.awq, a.tokenizer_model or find_tokenizer_model())


if __name__ == "__main__":
    main()
