"""AutoAWQ 0.2.9 (the tool most Hub AWQ repos were made with) agrees with our format reference.

AutoAWQ needs transformers 4.51.3, so it lives in its own venv (`scripts/setup_autoawq_venv.sh`
creates `.venv-autoawq`); a script run there quantizes a tiny fp16 Mixtral and dumps AutoAWQ's
own dequantization and packing. Here, with `kernels.awq_format`, we check the conclusions:
shapes, nibble order (our dequantization == AutoAWQ's exactly), zero points in 0..15, router
gate left unquantized, quantization_config fields, and bit-identical packing of one weight.
Then the AutoAWQ-made checkpoint, as AutoAWQ saved it, runs through our engine
(`serving.loader.load_model`, and `LLM` on the CPU): last-position logits equal transformers'
on the dequantized weights within 1e-4 (float32, logits O(1)) and 32 greedy tokens agree.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hubdeploy.kernels.awq_format import awq_dequantize, awq_quantize, awq_unpack
from tests.helpers_forward import (
    dequantized_copy,
    greedy_generate,
    hf_greedy,
    hf_last_logits,
    prefill_last_logits,
)

REPO = Path(__file__).resolve().parents[1]
VENV_PY = Path(os.environ.get("AUTOAWQ_VENV", REPO / ".venv-autoawq")) / "bin" / "python"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VENV_PY.is_file(),
        reason=f"AutoAWQ venv missing ({VENV_PY}); create it with scripts/setup_autoawq_venv.sh",
    ),
]

VENV_SCRIPT = textwrap.dedent(
    r'''
    import json, sys, time
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    from awq import AutoAWQForCausalLM
    from awq.quantize.quantizer import AwqQuantizer
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    src, out, corpus_file = sys.argv[1], sys.argv[2], sys.argv[3]
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoAWQForCausalLM.from_pretrained(src, torch_dtype=torch.float16, device_map="cpu")
    # Many short texts: AutoAWQ silently drops samples longer than max_calib_seq_len.
    lines = [ln.strip() for ln in open(corpus_file).read().splitlines() if ln.strip()]
    calib = [" ".join(lines[i:i + 2]) for i in range(len(lines))] * 3
    qcfg = {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}
    model.quantize(tok, quant_config=qcfg, calib_data=calib, max_calib_seq_len=32,
                   max_calib_samples=len(calib), n_parallel_calib_samples=None,
                   apply_clip=False)  # clip search needs out_features % 64 == 0 (k/v here: 32)
    model.save_quantized(out + "/awq")
    sd = load_file(out + "/awq/model.safetensors")
    deq = {}
    for k, v in sd.items():
        if k.endswith(".qweight"):
            b = k[: -len(".qweight")]
            deq[b] = dequantize_gemm(v, sd[b + ".qzeros"], sd[b + ".scales"], 4, 32).contiguous()
    save_file(deq, out + "/autoawq_dequant.safetensors")
    # AutoAWQ's own pack of a known fp16 weight (pseudo-quantize, then WQLinear_GEMM.from_linear).
    fp = load_file(src + "/model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.1.w2"
    w = fp[name + ".weight"]
    q = AwqQuantizer.__new__(AwqQuantizer)
    q.w_bit, q.group_size, q.zero_point = 4, 32, True
    wq, scales, zeros = q.pseudo_quantize_tensor(w.clone())
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float16)
    lin.weight.data = wq
    ql = WQLinear_GEMM.from_linear(lin, 4, 32, False, scales.t().contiguous(), zeros.t().contiguous())
    save_file({"qweight": ql.qweight.contiguous(), "qzeros": ql.qzeros.contiguous(), "scales": ql.scales.contiguous()},
              out + "/autoawq_pack.safetensors", metadata={"name": name})
    print(json.dumps({"seconds": round(time.time() - t0, 2)}))
    '''
)


@pytest.fixture(scope="module")
def autoawq_run(tiny_models, tmp_path_factory):
    from hubdeploy.serving.tiny.tokenizer import CORPUS

    src = tiny_models("mixtral", "none")
    out = tmp_path_factory.mktemp("autoawq")
    script = out / "quantize_with_autoawq.py"
    script.write_text(VENV_SCRIPT)
    corpus = out / "corpus.txt"
    corpus.write_text(CORPUS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([str(VENV_PY), str(script), str(src), str(out), str(corpus)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=out)
    if proc.returncode != 0:
        pytest.fail(f"AutoAWQ script failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    print("AutoAWQ run:", proc.stdout.strip().splitlines()[-1])
    return src, out


def test_layout_and_dequantization_match_autoawq(autoawq_run) -> None:
    src, out = autoawq_run
    sd = load_file(str(out / "awq" / "model.safetensors"))
    theirs = load_file(str(out / "autoawq_dequant.safetensors"))
    fp = load_file(str(src / "model.safetensors"))
    names = sorted(k[: -len(".qweight")] for k in sd if k.endswith(".qweight"))
    # Every attention projection and every expert linear of both layers, nothing else.
    assert len(names) == 2 * (4 + 4 * 3), names
    for name in names:
        qw, qz, s = sd[f"{name}.qweight"], sd[f"{name}.qzeros"], sd[f"{name}.scales"]
        out_f, in_f = fp[f"{name}.weight"].shape
        assert qw.dtype == torch.int32 and qw.shape == (in_f, out_f // 8), name
        assert qz.dtype == torch.int32 and qz.shape == (in_f // 32, out_f // 8), name
        assert s.dtype == torch.float16 and s.shape == (in_f // 32, out_f), name
        iw, iz = awq_unpack(qw, qz)
        assert int(iz.max()) <= 15 and int(iw.max()) <= 15
        ours = awq_dequantize(qw, qz, s, 32)
        assert torch.equal(ours, theirs[name].to(ours.dtype)), f"{name}: our dequantization differs from AutoAWQ's"
    # Router gate, norms, embeddings, lm_head: plain fp16 tensors.
    for layer in (0, 1):
        gate = sd[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert gate.dtype == torch.float16 and gate.shape == (4, 64)
        assert f"model.layers.{layer}.block_sparse_moe.gate.qweight" not in sd
    assert sd["lm_head.weight"].dtype == torch.float16 and sd["model.embed_tokens.weight"].dtype == torch.float16
    cfg = json.loads((out / "awq" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["zero_point"], q["version"].lower()) == ("awq", 4, 32, True, "gemm")
    assert q.get("modules_to_not_convert") == ["gate"]


def test_our_tiny_awq_config_declares_what_autoawq_writes(autoawq_run, tiny_models) -> None:
    _, out = autoawq_run
    theirs = json.loads((out / "awq" / "config.json").read_text())["quantization_config"]
    ours = json.loads((tiny_models("mixtral", "awq") / "config.json").read_text())["quantization_config"]
    norm = {k: (v.lower() if isinstance(v, str) else v) for k, v in theirs.items()}
    for key in ("quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert"):
        assert ours[key] == norm[key], key


def test_our_quantizer_packs_bit_identically_to_autoawq(autoawq_run) -> None:
    src, out = autoawq_run
    from safetensors import safe_open

    with safe_open(str(out / "autoawq_pack.safetensors"), "pt") as f:
        name = f.metadata()["name"]
        theirs = {k: f.get_tensor(k) for k in ("qweight", "qzeros", "scales")}
    w = load_file(str(src / "model.safetensors"))[f"{name}.weight"]
    qweight, qzeros, scales = awq_quantize(w, 32)
    assert torch.equal(scales, theirs["scales"])
    assert torch.equal(qzeros, theirs["qzeros"])
    assert torch.equal(qweight, theirs["qweight"])


LOGIT_ATOL = 1e-4  # as tests/test_models.py: float32 on both sides
PROMPTS = [[1, 57, 203, 88, 14, 311, 92, 7, 150, 61, 33], [1, 12], [1, 100, 3, 250, 21, 90]]


def test_autoawq_checkpoint_runs_in_our_engine_like_transformers(autoawq_run, tmp_path: Path) -> None:
    """Issue 3: a checkpoint quantized by AutoAWQ itself loads in our engine and matches its
    dequantized reference (transformers on float32 weights (q - z) * s)."""
    from transformers import AutoModelForCausalLM

    from hubdeploy.serving.loader import load_model
    from hubdeploy.serving.models.layers import Linear

    src, out = autoawq_run
    ckpt = out / "awq"
    model, cfg = load_model(ckpt)  # exactly the files AutoAWQ wrote
    assert cfg.quant is not None and cfg.quant.is_awq and cfg.quant.group_size == 32
    assert model.dtype == torch.float32
    quantized = [m for m in model.modules() if isinstance(m, Linear) and m.quantized]
    assert quantized and all(m.packed is not None for m in quantized)

    ref_dir = dequantized_copy(ckpt, tmp_path / "deq")
    # The reference weights are AutoAWQ's own dequantization (theirs is fp16: the same values rounded).
    theirs = load_file(str(out / "autoawq_dequant.safetensors"))
    ref_sd = load_file(str(ref_dir / "model.safetensors"))
    assert theirs and all(torch.equal(ref_sd[f"{n}.weight"].t().half(), w.half()) for n, w in theirs.items())

    hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    prompts = [[t % cfg.vocab_size for t in p] for p in PROMPTS]
    ours = prefill_last_logits(model, prompts)
    ref = hf_last_logits(hf, prompts)
    diff = (ours - ref).abs().max().item()
    print(f"AutoAWQ checkpoint: max abs logit diff {diff:.2e} (logit scale {ref.abs().max().item():.1f})")
    assert diff <= LOGIT_ATOL, f"AutoAWQ-made checkpoint: max abs logit diff {diff:.2e}"
    expect = hf_greedy(hf, prompts, 32)
    assert greedy_generate(model, prompts, 32) == expect

    # The public entry point: `LLM` on the CPU, no LoRA (tokenizer files copied from the source,
    # since AutoAWQ's save_quantized writes only config + weights).
    from hubdeploy.serving import LLM, SamplingParams

    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            (ckpt / f.name).write_bytes(f.read_bytes())
    llm = LLM(str(ckpt), device="cpu", dtype="float32", max_model_len=128)
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == expect
