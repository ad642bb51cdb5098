"""Will a model fit one GPU, and with what engine settings? (`plan(report, gpu) -> MemoryPlan`)

Budget = GPU memory × gpu_memory_utilization. From it: weights (exact, from safetensors
headers, fp16 embeddings/lm_head as stored, plus the zero points a symmetric
compressed-tensors checkpoint gets at load), runtime overhead (CUDA context, activations
for `max_num_batched_tokens`, workspace, CUDA graphs, LoRA slots = max_loras × one adapter
at max rank), and what is left is the paged KV cache:
KV bytes/token = 2 (K and V) × layers × kv_heads × head_dim × dtype bytes.
Batch-1 decode speed is bandwidth-bound: tok/s = bandwidth × efficiency / bytes read per
token (attention + router + norms + active experts + lm_head).
`MemoryPlan.engine_defaults()` gives the `hubdeploy serve` options the deploy service uses.
`plan(..., quantize="awq")` plans the AWQ checkpoint quantize-on-deploy would make
(`awq_on_deploy_bytes`) instead of the weights as stored.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

from hubdeploy.hub_integration.gpus import GPU, catalog, get_gpu
from hubdeploy.serving.config import engine_argv

if TYPE_CHECKING:
    from hubdeploy.hub_integration.report import AdapterInfo, ModelReport

GiB = 2**30
CUDA_CONTEXT_BYTES = 512 * 2**20  # driver context + allocator slack (not visible to torch)
WORKSPACE_BYTES = 256 * 2**20  # kernel scratch, sampler buffers
CUDA_GRAPH_BYTES = 512 * 2**20  # decode graphs for batch sizes 1, 2, 4, 8, 16, ...
DEFAULT_BATCHED_TOKENS = 2048
MAX_NUM_SEQS_CAP = 256
MIN_CONTEXT = 2048  # a plan that cannot hold one sequence this long (or the model's context) does not fit
DECODE_EFFICIENCY = 0.6  # fraction of peak bandwidth a good W4A16 decode reaches (gpt-fast ≈ 61%)
# the engine knobs a plan sizes: `plan()` keywords, `MemoryPlan` fields and `EngineArgs` fields alike
PLANNED = ("max_model_len", "max_num_seqs", "gpu_memory_utilization", "max_num_batched_tokens", "max_loras",
           "max_lora_rank")
_KV_DTYPE_BYTES = {"auto": 2, "fp16": 2, "bf16": 2, "float16": 2, "bfloat16": 2, "fp8": 1, "fp8_e4m3": 1}


@dataclass
class MemoryPlan:
    gpu: str
    fits: bool
    reason: str
    gpu_memory_bytes: int
    gpu_memory_utilization: float
    budget_bytes: int
    weights_bytes: int
    activation_bytes: int
    workspace_bytes: int  # CUDA context + workspace
    cuda_graph_bytes: int
    lora_bytes: int
    max_loras: int
    max_lora_rank: int
    kv_cache_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int
    block_size: int
    model_context: int
    max_model_len: int
    max_num_seqs: int
    concurrency_at_max_len: int
    max_num_batched_tokens: int
    decode_bytes_per_token: int
    decode_tok_s: float
    roofline_ms_per_token: float
    quantize: str | None = None  # "awq": planned for the checkpoint quantize-on-deploy writes
    quantize_group_size: int | None = None

    @property
    def overhead_bytes(self) -> int:
        return self.activation_bytes + self.workspace_bytes + self.cuda_graph_bytes + self.lora_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overhead_bytes"] = self.overhead_bytes
        return d

    def engine_defaults(self) -> dict[str, Any]:
        """The engine knobs this plan sizes (`EngineArgs` fields; the LoRA slots when it has any)."""
        if not self.fits:
            raise ValueError(f"no engine settings: the model does not fit {self.gpu}: {self.reason}")
        return {k: getattr(self, k) for k in (PLANNED if self.max_loras else PLANNED[:-2])}

    def serve_args(self) -> list[str]:
        """The `hubdeploy serve` flags of `engine_defaults`."""
        return engine_argv(self.engine_defaults())


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def awq_bytes_per_param(group_size: int) -> float:
    """AWQ GEMM bytes per quantized weight: 4-bit `qweight`, an fp16 scale and a 4-bit zero per group."""
    return 0.5 + 2.0 / group_size + 0.5 / group_size


def awq_on_deploy_bytes(report: "ModelReport", group_size: int = 128) -> tuple[int, int]:
    """(weight bytes, decode bytes read per token) of the AWQ checkpoint quantize-on-deploy makes
    from this 16-bit model: its decoder linears at 4 bits (`report.awq_quantizable`), the rest
    (router gates, lm_head, embeddings, norms) as stored."""
    w = report.weights
    per_byte = awq_bytes_per_param(group_size) * (w.quantizable_params / w.quantizable_bytes) \
        if w.quantizable_bytes else 0.0
    total = w.total_bytes - w.quantizable_bytes + int(w.quantizable_params * awq_bytes_per_param(group_size))
    active_quant = w.quantizable_bytes - w.quantizable_expert_bytes
    if report.moe and report.moe.num_experts:
        active_quant += w.quantizable_expert_bytes * report.moe.experts_per_token // report.moe.num_experts
    decode = w.active_bytes_per_token - active_quant + int(active_quant * per_byte)
    return total, decode


def kv_bytes_per_token(report: "ModelReport", kv_cache_dtype: str = "auto") -> int:
    a = report.arch
    return 2 * a.num_layers * a.num_key_value_heads * a.head_dim * _KV_DTYPE_BYTES[kv_cache_dtype]


def activation_bytes(report: "ModelReport", batched_tokens: int, max_num_seqs: int) -> int:
    """Peak activations of one forward pass over `batched_tokens` (fp16) + fp32 logits."""
    a, m = report.arch, report.moe
    t = batched_tokens
    qkv = (a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim
    hidden_part = t * (6 * a.hidden_size + qkv) * 2
    if m:
        mlp = t * m.experts_per_token * 3 * m.expert_intermediate_size * 2  # [T·k, 2I] + [T·k, I]
    else:
        mlp = t * 3 * a.intermediate_size * 2
    logits = max_num_seqs * a.vocab_size * 4 * 2  # logits + probabilities, fp32
    return hidden_part + mlp + logits


def lora_adapter_bytes(report: "ModelReport", rank: int, targets: Sequence[str]) -> int:
    """fp16 bytes of one adapter at `rank` on `targets` (A: r×in, B: out×r per module)."""
    a, m = report.arch, report.moe
    h, hd = a.hidden_size, a.head_dim
    inter = m.expert_intermediate_size if m else a.intermediate_size
    experts = m.num_experts if m else 1
    dense_shapes = {"q_proj": (h, a.num_attention_heads * hd), "k_proj": (h, a.num_key_value_heads * hd),
                    "v_proj": (h, a.num_key_value_heads * hd), "o_proj": (a.num_attention_heads * hd, h)}
    mlp_shapes = {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
                  "w1": (h, inter), "w3": (h, inter), "w2": (inter, h)}
    total = 0
    for t in targets:
        name = t.rsplit(".", 1)[-1]
        if name in dense_shapes:
            d_in, d_out = dense_shapes[name]
            total += (d_in + d_out) * rank
        elif name in mlp_shapes:
            d_in, d_out = mlp_shapes[name]
            total += (d_in + d_out) * rank * experts
        elif name == "lm_head":
            total += (h + a.vocab_size) * rank
    return total * a.num_layers * 2


def _adapters(report: "ModelReport", adapters: Sequence["AdapterInfo | str"]) -> list["AdapterInfo"]:
    from hubdeploy.hub_integration.report import AdapterInfo

    by_id = {ad.repo_id: ad for ad in report.adapters}
    out = []
    for ad in adapters:
        if isinstance(ad, AdapterInfo):
            out.append(ad)
        elif ad in by_id:
            out.append(by_id[ad])
        else:
            raise ValueError(f"adapter {ad!r} is not among the adapters found for {report.repo_id} "
                             f"({', '.join(by_id) or 'none'}); pass its AdapterInfo instead")
    return out


def plan(report: "ModelReport", gpu: GPU | str, adapters: Sequence["AdapterInfo | str"] = (),
         max_model_len: int | None = None, *, max_num_seqs: int | None = None,
         max_loras: int | None = None, max_lora_rank: int | None = None,
         gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int | None = None,
         kv_cache_dtype: str = "auto", block_size: int = 16, cuda_graphs: bool = True,
         decode_efficiency: float = DECODE_EFFICIENCY, quantize: str | None = None,
         quantize_group_size: int = 128) -> MemoryPlan:
    """Plan memory for serving `report`'s model on one `gpu` with the chosen adapters
    (`quantize="awq"`: the checkpoint quantize-on-deploy makes from it)."""
    g = get_gpu(gpu)
    ads = _adapters(report, adapters)
    rank = max_lora_rank or max((ad.rank or 0 for ad in ads), default=0)
    n_loras = (max_loras if max_loras is not None else min(len(ads), 4)) if (ads or max_loras) else 0
    targets = sorted({t for ad in ads for t in ad.target_modules}) or ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = n_loras * lora_adapter_bytes(report, rank, targets) if n_loras and rank else 0

    context = report.arch.context_length
    batched = max_num_batched_tokens or max(DEFAULT_BATCHED_TOKENS, min(max_model_len or 0, 8192))
    seqs_for_act = max_num_seqs or MAX_NUM_SEQS_CAP
    act = activation_bytes(report, batched, seqs_for_act)
    work = CUDA_CONTEXT_BYTES + WORKSPACE_BYTES
    graphs = CUDA_GRAPH_BYTES if cuda_graphs else 0
    budget = int(g.memory_bytes * gpu_memory_utilization)
    weights = report.weights.total_bytes + report.weights.load_extra_bytes
    bpt = report.weights.active_bytes_per_token
    if quantize:
        weights, bpt = awq_on_deploy_bytes(report, quantize_group_size)
    kv_bytes = budget - weights - act - work - graphs - lora
    per_tok = kv_bytes_per_token(report, kv_cache_dtype)
    blocks = max(kv_bytes, 0) // (per_tok * block_size) if per_tok else 0
    kv_tokens = blocks * block_size
    want = max_model_len or context
    mml = min(want, context, kv_tokens)
    need = max_model_len or min(context, MIN_CONTEXT)
    budget_txt = f"{gpu_memory_utilization:.0%} of {g.name}'s {g.memory_bytes / GiB:.1f} GiB = {_gb(budget)}"
    if weights > budget:
        fits = False
        reason = f"weights {_gb(weights)} exceed {budget_txt}"
        if report.awq_variants:
            reason += f"; try the AWQ 4-bit variant {report.awq_variants[0]}"
        elif not quantize and report.quant.method == "none":
            reason += "; or quantize it to AWQ 4-bit on deploy (quantize: awq)"
    elif kv_bytes <= 0:
        fits = False
        reason = (f"weights {_gb(weights)} + runtime {_gb(act + work + graphs + lora)} exceed {budget_txt}; "
                  "no memory is left for the KV cache")
    elif max_model_len and max_model_len > context:
        fits = False
        reason = f"max_model_len {max_model_len} is above the model's context length {context}"
    elif kv_tokens < need:
        fits = False
        reason = (f"the KV cache holds only {kv_tokens} tokens ({_gb(kv_bytes)} left after weights "
                  f"{_gb(weights)}), fewer than the {need} needed")
    else:
        fits = True
        reason = (f"weights {_gb(weights)} + runtime {_gb(act + work + graphs + lora)} leave {_gb(kv_bytes)} "
                  f"for {kv_tokens} KV tokens; max_model_len {mml}")
    conc = kv_tokens // mml if fits and mml else 0
    seqs = max_num_seqs or (max(1, min(MAX_NUM_SEQS_CAP, max(conc, kv_tokens // 2048))) if fits else 0)
    bw = g.bandwidth_gbs * 1e9
    return MemoryPlan(
        gpu=g.name, fits=fits, reason=reason, gpu_memory_bytes=g.memory_bytes,
        gpu_memory_utilization=gpu_memory_utilization, budget_bytes=budget, weights_bytes=weights,
        activation_bytes=act, workspace_bytes=work, cuda_graph_bytes=graphs, lora_bytes=lora,
        max_loras=n_loras, max_lora_rank=rank if n_loras else 0,
        kv_cache_bytes=max(kv_bytes, 0), kv_bytes_per_token=per_tok, kv_tokens=kv_tokens,
        block_size=block_size, model_context=context, max_model_len=mml if fits else 0,
        max_num_seqs=seqs, concurrency_at_max_len=conc, max_num_batched_tokens=batched,
        decode_bytes_per_token=bpt,
        decode_tok_s=bw * decode_efficiency / bpt if bpt else 0.0,
        roofline_ms_per_token=bpt / bw * 1e3 if bpt else 0.0,
        quantize=quantize, quantize_group_size=quantize_group_size if quantize else None,
    )


def plan_all(report: "ModelReport", gpus: Sequence[GPU | str] | None = None, **kw: Any) -> list[MemoryPlan]:
    """One plan per GPU of the catalog (or of `gpus`), smallest first."""
    return [plan(report, g, **kw) for g in (gpus or catalog())]
