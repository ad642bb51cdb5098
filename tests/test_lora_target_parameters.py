"""PEFT LoRA on fused MoE expert parameters (`target_parameters`), as PEFT 0.21 saves it for
transformers 5's Mixtral / Qwen3-MoE (`mlp.experts.gate_up_proj [E, 2I, H]`,
`mlp.experts.down_proj [E, H, I]`), served by converting it on load into per-expert LoRA.

References: PEFT's own `ParamWrapper.get_delta_weight` (per-expert deltas, float64 compare)
and `transformers` + `PeftModel` with the adapter applied (greedy tokens equal, the chosen
tokens' log-probs within test_lora_engine's LOGPROB_ATOL = 1e-3, fp32 on both sides, on the
fp16 tiny checkpoints). Every adapter here is written by PEFT's `save_pretrained` itself.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubdeploy.serving.loader import load_model
from hubdeploy.serving.lora import LoRAError, load_adapter
from hubdeploy.serving.lora.adapter import TargetShape
from tests.helpers_forward import peft_greedy_logprobs
from tests.test_lora_engine import GREEDY, LOGPROB_ATOL, NEW, PROMPTS, _check, make_llm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/fixtures/engine.py

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
VARIANTS: dict[str, dict[str, Any]] = {
    # both fused parameters (nested ParamWrappers) + attention modules; per-parameter rank and alpha
    "both": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS,
                 rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 4}),
    # one parameter only (no nesting), no target modules, rsLoRA scaling
    "gate_up_rslora": dict(r=8, lora_alpha=8, target_modules=[], target_parameters=["gate_up_proj"],
                           use_rslora=True),
    # layers_to_transform limits target_modules but, in PEFT, not target_parameters
    "down_layers": dict(r=4, lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[1],
                        target_parameters=["experts.down_proj"]),
}
# A ~ N(0, 1/in), B ~ N(0, B_STD^2): deltas the size of the base weights, so that the adapter shows
B_STD = 0.05


def _targets(model) -> dict[str, TargetShape]:
    return {n: TargetShape(t.in_features, t.out_features) for n, t in model.lora_targets().items()}


def _build_peft(base_dir: Path, opts: dict[str, Any], seed: int = 0):
    """A PEFT model on the transformers base with random non-zero LoRA weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **opts))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_A." in n:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * B_STD)
    return pm.eval()


@pytest.fixture(scope="module")
def peft_adapter(tiny_models, tmp_path_factory) -> Callable[[str, str], tuple[Path, Path, Any]]:
    """(arch, variant) -> (base dir, adapter dir saved by PEFT, the PEFT model that saved it)."""
    root = tmp_path_factory.mktemp("peft_target_parameters")
    cache: dict[tuple[str, str], tuple[Path, Path, Any]] = {}

    def get(arch: str, variant: str) -> tuple[Path, Path, Any]:
        if (arch, variant) not in cache:
            base = tiny_models(arch, "none")
            pm = _build_peft(base, VARIANTS[variant])
            out = root / f"{arch}-{variant}"
            pm.save_pretrained(str(out))
            cache[(arch, variant)] = (base, out, pm)
        return cache[(arch, variant)]

    return get


@pytest.fixture(scope="module")
def ours() -> Callable[[Path], Any]:
    models: dict[Path, Any] = {}

    def get(base: Path):
        if base not in models:
            models[base] = load_model(base, "cpu", torch.float32)[0]
        return models[base]

    return get


# ---------------------------------------------------------------- the saved format, as PEFT writes it
def test_peft_saves_nested_wrappers_with_expert_major_rows(peft_adapter) -> None:
    """What the converter relies on: keys, nesting order and [r*E, in] / [out, r*E] shapes."""
    _, ad, _ = peft_adapter("mixtral", "both")
    sd = load_file(str(ad / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.0.mlp.experts"
    E, H, I = 4, 64, 128  # tiny Mixtral (serving/tiny/spec.py)
    assert sd[f"{pre}.base_layer.lora_A.weight"].shape == (4 * E, H)  # inner: gate_up_proj, r=4
    assert sd[f"{pre}.base_layer.lora_B.weight"].shape == (2 * I, 4 * E)
    assert sd[f"{pre}.lora_A.weight"].shape == (2 * E, I)  # outer: down_proj, rank_pattern r=2
    assert sd[f"{pre}.lora_B.weight"].shape == (H, 2 * E)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(EXPERTS)  # the nesting does not follow this order


# ---------------------------------------------------------------- conversion vs PEFT's own deltas
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_per_expert_deltas_equal_peft_delta_weight(arch: str, variant: str, peft_adapter, ours) -> None:
    """Every converted per-expert pair gives exactly PEFT's per-expert delta (float64, 1e-6),
    and the set of modules is exactly what PEFT wraps (experts expanded, our naming)."""
    from peft.tuners.lora import ParamWrapper

    base, ad, pm = peft_adapter(arch, variant)
    model = ours(base)
    adapter = load_adapter("tp", str(ad), _targets(model), max_lora_rank=16)
    expected: dict[str, torch.Tensor] = {}
    for name, mod in pm.named_modules():
        name = name.removeprefix("base_model.model.")
        if isinstance(mod, ParamWrapper):
            layer = int(name.split(".")[2])
            moe = model.layers[layer].mlp
            delta = mod.get_delta_weight("default").double()  # [E, out, in]
            for e in range(moe.num_experts):
                if mod.parameter_name == "gate_up_proj":
                    expected[moe.expert_name(e, "w1")] = delta[e, : moe.inter]
                    expected[moe.expert_name(e, "w3")] = delta[e, moe.inter:]
                else:
                    expected[moe.expert_name(e, "w2")] = delta[e]
        elif hasattr(mod, "lora_A") and "default" in mod.lora_A:  # a plain lora.Linear (target_modules)
            expected[name] = mod.get_delta_weight("default").double()
    assert expected and set(adapter.modules) == set(expected)
    for n, want in expected.items():
        m = adapter.modules[n]
        torch.testing.assert_close(m.scaling * m.b.double() @ m.a.double(), want, atol=1e-6, rtol=1e-6, msg=n)
    assert adapter.max_rank == {"both": 4, "gate_up_rslora": 8, "down_layers": 4}[variant]


def test_expert_naming_of_the_checkpoint_is_used(peft_adapter, ours) -> None:
    """transformers 5 names Mixtral's block `mlp`; our Mixtral checkpoint says `block_sparse_moe.experts.N.w1`."""
    base, ad, _ = peft_adapter("mixtral", "both")
    a = load_adapter("tp", str(ad), _targets(ours(base)), 16)
    names = set(a.modules)
    assert {f"model.layers.1.block_sparse_moe.experts.3.{w}" for w in ("w1", "w2", "w3")} <= names
    assert not any(".mlp." in n for n in names)
    w1, w3 = (a.modules[f"model.layers.0.block_sparse_moe.experts.2.{w}"] for w in ("w1", "w3"))
    assert torch.equal(w1.a, w3.a) and w1.b.shape == w3.b.shape == (128, 4)  # shared A_e, B_e split by rows
    # patterns match the parameter name: gate_up_proj r=4, alpha 4 -> 1.0; down_proj r=2, alpha 8 -> 4.0
    assert (w1.scaling, w3.scaling, w1.rank) == (1.0, 1.0, 4)
    w2 = a.modules["model.layers.0.block_sparse_moe.experts.2.w2"]
    assert (w2.scaling, w2.rank) == (4.0, 2)
    assert a.modules["model.layers.1.self_attn.q_proj"].scaling == 2.0


# ---------------------------------------------------------------- the engine vs transformers + PEFT
def _peft_greedy(base_dir: Path, ad: Path) -> list[tuple[list[int], list[float]]]:
    """`PeftModel.from_pretrained` (adapter applied, not merged): greedy tokens and log-probs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PeftModel.from_pretrained(base, str(ad)).eval()
    refs, changed = peft_greedy_logprobs(ref, PROMPTS, NEW)
    assert changed > 0.05, f"the adapter changes nothing (max logit change {changed:.3g})"
    return refs


@pytest.mark.parametrize("arch,variant", [("mixtral", "both"), ("qwen3_moe", "both"), ("qwen3_moe", "gate_up_rslora")])
def test_engine_matches_transformers_with_peft_applied(arch: str, variant: str, peft_adapter) -> None:
    base, ad, _ = peft_adapter(arch, variant)
    refs = _peft_greedy(base, ad)
    llm = make_llm(base, lora_modules={"tp": str(ad)}, max_loras=1)
    try:
        outs = llm.generate(PROMPTS, GREEDY, lora="tp")
        _check(outs, refs, f"{arch} target_parameters {variant}", atol=LOGPROB_ATOL)
        diff = max(abs(x.logprob - y) for o, (_, lps) in zip(outs, refs) for x, y in zip(o.logprobs, lps))
        print(f"{arch} {variant}: greedy tokens equal, max log-prob diff vs transformers+PEFT {diff:.2e}")
    finally:
        del llm


# ---------------------------------------------------------------- malformed adapters
def _copy_edit(src: Path, dst: Path, cfg: dict[str, Any] | None = None,
               tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> Path:
    shutil.copytree(src, dst)
    if cfg is not None:
        c = json.loads((dst / "adapter_config.json").read_text())
        c.update(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(c))
    if tensors is not None:
        f = dst / "adapter_model.safetensors"
        save_file({k: v.contiguous() for k, v in tensors(load_file(str(f))).items()}, str(f))
    return dst


GU = "base_model.model.model.layers.0.mlp.experts.base_layer"  # gate_up_proj (inner wrapper)
DN = "base_model.model.model.layers.0.mlp.experts"  # down_proj (outer wrapper)


def _with(key: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    return lambda sd: {k: (fn(v) if k == key else v) for k, v in sd.items()}


MALFORMED: dict[str, tuple[str, dict[str, Any]]] = {
    "unknown_parameter": (r"target_parameters entry 'mlp\.experts\.gate_up_proj_bias'.*only the fused MoE expert",
                          dict(cfg={"target_parameters": EXPERTS + ["mlp.experts.gate_up_proj_bias"]})),
    "router_parameter": (r"'mlp\.gate\.weight'.*router", dict(cfg={"target_parameters": ["mlp.gate.weight"]})),
    "not_a_list": ("must be a list", dict(cfg={"target_parameters": "mlp.experts.down_proj"})),
    "rows_not_r_times_experts": (r"gate_up_proj has 15 LoRA rows but rank 4 .* 4 experts .* needs 16",
                                 dict(tensors=lambda sd: _with(f"{GU}.lora_B.weight", lambda t: t[:, :15])(
                                     _with(f"{GU}.lora_A.weight", lambda t: t[:15])(sd)))),
    "wrong_in_features": (r"down_proj has lora_A \(8, 64\).*in=128, out=64",
                          dict(tensors=_with(f"{DN}.lora_A.weight", lambda t: t[:, :64]))),
    "a_b_disagree": (r"gate_up_proj has lora_A \(16, 64\) and lora_B \(256, 12\)",
                     dict(tensors=_with(f"{GU}.lora_B.weight", lambda t: t[:, :12]))),
    "missing_b": ("has no lora_B weight", dict(tensors=lambda sd: {k: v for k, v in sd.items()
                                                                   if k != f"{DN}.lora_B.weight"})),
    "nesting_deeper_than_config": (r"weights of 2 nested PEFT ParamWrapper\(s\).*selects 1 parameter\(s\) there "
                                   r"\['gate_up_proj'\]",
                                   dict(cfg={"target_parameters": ["mlp.experts.gate_up_proj"]})),
    "config_without_target_parameters": ("has no target_parameters", dict(cfg={"target_parameters": None})),
    "nan": ("NaN or inf", dict(tensors=_with(f"{GU}.lora_A.weight", lambda t: t.index_fill(0, torch.tensor([3]),
                                                                                            float("nan"))))),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_target_parameters_adapters_are_refused(case: str, peft_adapter, ours, tmp_path) -> None:
    base, ad, _ = peft_adapter("mixtral", "both")
    words, edit = MALFORMED[case]
    bad = _copy_edit(ad, tmp_path / case, **edit)
    with pytest.raises(LoRAError, match=words):
        load_adapter("bad", str(bad), _targets(ours(base)), 16)


def test_rank_limit_and_other_base_model_are_refused(peft_adapter, ours, tiny_models) -> None:
    base, ad, _ = peft_adapter("mixtral", "both")
    with pytest.raises(LoRAError, match=r"rank 4 \(model\.layers\.\d\.mlp\.experts\.gate_up_proj\) exceeds "
                                        r"max_lora_rank=3; restart with --max-lora-rank 4"):
        load_adapter("big", str(ad), _targets(ours(base)), max_lora_rank=3)
    # a Qwen3-MoE adapter (8 experts, I=64) on the tiny Mixtral (4 experts, I=128)
    _, qwen_ad, _ = peft_adapter("qwen3_moe", "gate_up_rslora")
    with pytest.raises(LoRAError, match=r"gate_up_proj has lora_A \(64, 64\) and lora_B \(128, 64\), but the base "
                                        r"model's gate_up_proj has in=64, out=256"):
        load_adapter("other", str(qwen_ad), _targets(ours(base)), 16)
    # and a dense model has no experts at all
    with pytest.raises(LoRAError, match=r"fused expert parameters of model\.layers\.0\.mlp\.experts, but the base "
                                        r"model has no MoE experts there"):
        load_adapter("dense", str(ad), _targets(ours(tiny_models("llama", "none"))), 16)
