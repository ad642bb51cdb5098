"""Quantize time per decoder layer (issue 19): our AWQ and round-to-nearest, whole-model estimate.

    python benchmarks/quantize_layer.py --shape tiny|wide|mixtral [--layers 2] [--tokens 2048] [--rounds 3]

Writes a random-weight fp16 Mixtral-family checkpoint of the chosen shape (tiny: the test
models' 64 hidden / 4 experts; wide: hidden 1024, ffn 3584, 8 experts top-2, 8/2 heads of 128;
mixtral: one full-size Mixtral-8x7B layer, hidden 4096, ffn 14336, 8 experts, for a GPU) with
the tiny tokenizer, and calibration text of about `--tokens` tokens (the shipped set, repeated),
then runs `quantize_model` (group size 128; 32 for tiny) for AWQ and round-to-nearest in alternation, `--rounds` times, and
times each layer from the progress callback. Prints per-layer medians with min..max spread
and the estimate for Mixtral-8x7B's 32 layers (per-layer time at this width x 32: the wide
shape is 1/4 of its width, ~1/16 of its weights); `--json` writes all figures.
Uses only torch, safetensors and our package; runs from the source tree; `--device` picks the
device (default: CUDA when available).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import MIXTRAL_8X7B, use_source_tree

use_source_tree()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SHAPES = {
    "tiny": dict(hidden=64, ffn=128, experts=4, heads=4, kv=2, head_dim=16),
    "wide": dict(hidden=1024, ffn=3584, experts=8, heads=8, kv=2, head_dim=128),
    "mixtral": dict(hidden=MIXTRAL_8X7B["hidden_size"], ffn=MIXTRAL_8X7B["intermediate_size"], experts=8,
                    heads=MIXTRAL_8X7B["num_attention_heads"], kv=MIXTRAL_8X7B["num_key_value_heads"],
                    head_dim=MIXTRAL_8X7B["head_dim"]),
}


def write_model(d: Path, shape: dict, layers: int) -> Path:
    """A random fp16 Mixtral checkpoint (one shard per layer) with the tiny model's tokenizer."""
    from hubdeploy.serving.tiny import make_tiny

    tiny = make_tiny(d / "tok", arch="mixtral", quant="none")
    cfg = json.loads((tiny / "config.json").read_text())
    h, f, e = shape["hidden"], shape["ffn"], shape["experts"]
    nh, nkv, hd = shape["heads"], shape["kv"], shape["head_dim"]
    cfg.update(hidden_size=h, intermediate_size=f, num_local_experts=e, num_attention_heads=nh,
               num_key_value_heads=nkv, head_dim=hd, num_hidden_layers=layers)
    src = d / "fp16"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(tiny / name, src / name)
    (src / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def rnd(*s: int) -> torch.Tensor:
        return (torch.randn(*s, generator=g) * 0.02).half()

    weight_map = {}
    vocab = cfg["vocab_size"]
    for i in range(layers + 1):
        p = f"model.layers.{i}."
        t = ({"model.embed_tokens.weight": rnd(vocab, h), "model.norm.weight": torch.ones(h).half(),
              "lm_head.weight": rnd(vocab, h)} if i == layers else
             {p + "input_layernorm.weight": torch.ones(h).half(), p + "post_attention_layernorm.weight": torch.ones(h).half(),
              p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(nkv * hd, h),
              p + "self_attn.v_proj.weight": rnd(nkv * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
              p + "block_sparse_moe.gate.weight": rnd(e, h),
              **{p + f"block_sparse_moe.experts.{x}.{w}.weight": (rnd(f, h) if w != "w2" else rnd(h, f))
                 for x in range(e) for w in ("w1", "w2", "w3")}})
        name = f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(t, str(src / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return src


def calib_file(d: Path, src: Path, tokens: int) -> tuple[Path, int]:
    """The shipped calibration text repeated to about `tokens` tokens (for this tokenizer)."""
    from hubdeploy.quantize.calibration import SHIPPED_PATH
    from hubdeploy.serving.tokenizer import load_tokenizer

    text = SHIPPED_PATH.read_text()
    per_copy = sum(len(load_tokenizer(src).encode(p)) for p in text.split("\n\n") if p.strip())
    path = d / "calib.txt"
    path.write_text("\n\n".join([text] * max(1, -(-tokens // per_copy))))
    return path, per_copy


def run_once(src: Path, out: Path, method: str, group: int, calib: Path, n_samples: int, seq_len: int,
             device: str) -> dict:
    from hubdeploy.quantize import QuantizeProgress, QuantizeSettings, quantize_model

    marks: list[tuple[float, int]] = []

    def progress(p: QuantizeProgress) -> None:
        if p.stage == "layer":
            marks.append((time.perf_counter(), p.layers_done))

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    quantize_model(src, out, QuantizeSettings(method=method, group_size=group, calib=calib, n_samples=n_samples,
                                              seq_len=seq_len), progress, device=device)
    total = time.perf_counter() - t0
    shutil.rmtree(out)
    per_layer = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    return dict(total_s=total, per_layer_s=per_layer, before_first_layer_s=marks[0][0] - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="wide")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens (blocks of --seq-len)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = SHAPES[a.shape]
    n_samples = max(1, a.tokens // a.seq_len)
    with tempfile.TemporaryDirectory(prefix="quantize-bench-") as tmp:
        d = Path(tmp)
        src = write_model(d, shape, a.layers)
        calib, _ = calib_file(d, src, n_samples * a.seq_len)
        rows: dict[str, list[float]] = {"awq": [], "rtn": []}
        raw = []
        for r in range(a.rounds):
            for method in (("awq", "rtn") if r % 2 == 0 else ("rtn", "awq")):
                res = run_once(src, d / f"out-{method}", method, 32 if a.shape == "tiny" else 128, calib,
                               n_samples, a.seq_len, a.device)
                rows[method] += res["per_layer_s"]
                raw.append(dict(method=method, round=r, **res))
                print(f"round {r} {method}: layers {', '.join(f'{s:.2f}' for s in res['per_layer_s'])} s, "
                      f"total {res['total_s']:.2f} s", flush=True)
    width = shape["hidden"] * shape["ffn"] * shape["experts"]
    full = MIXTRAL_8X7B["hidden_size"] * MIXTRAL_8X7B["intermediate_size"] * 8
    summary = {"shape": a.shape, **shape, "device": a.device, "calib_tokens": n_samples * a.seq_len,
               "seq_len": a.seq_len, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for method, xs in rows.items():
        med = statistics.median(xs)
        summary[method] = dict(median_s=med, min_s=min(xs), max_s=max(xs), n=len(xs))
        line = f"{method}: {med:.2f} s per layer (min {min(xs):.2f} .. max {max(xs):.2f}, n={len(xs)})"
        if a.shape != "tiny":  # tiny layers are all overhead: no basis for an estimate
            est = med * 32 * (full / width if a.shape != "mixtral" else 1)
            summary[method]["mixtral_8x7b_estimate_s"] = est
            line += (f"; Mixtral-8x7B (32 layers{'' if a.shape == 'mixtral' else f', weights x{full / width:.0f}'}): "
                     f"~{est / 60:.1f} min")
        print(line, flush=True)
    ratio = [x / y for x, y in zip(rows["awq"], rows["rtn"])]
    print(f"awq / rtn per layer: median {statistics.median(ratio):.1f}x (min {min(ratio):.1f} .. max {max(ratio):.1f})")
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "runs": raw}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
