"""`ModelRunner`: owns the model and the paged KV cache, and runs one scheduled step.

Each step it flattens the scheduled chunks into one token vector, builds the
`ForwardContext` once (slots, block tables, context lengths), runs the model, and computes
logits only at the last position of each sequence that samples. On CUDA it sizes the KV
cache from what a warm-up forward leaves of `gpu_memory_utilization`, and replays CUDA
graphs for decode batches (padded to 1, 2, 4, 8, 16, 32, ...; padding slots are -1),
also for decode steps with LoRA adapters (a static `LoRABatch`, see `_lora_graph`).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from hubdeploy.serving.config import EngineArgs, ModelConfig
from hubdeploy.serving.cpu_backend import CpuBackend
from hubdeploy.serving.forward_context import ForwardContext
from hubdeploy.serving.scheduler import ScheduledSeq

if TYPE_CHECKING:
    from hubdeploy.serving.lora.manager import LoRAManager

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, config: EngineArgs, device: torch.device,
                 dtype: torch.dtype, lora_manager: LoRAManager | None = None) -> None:
        """`config` is the engine's, `max_model_len` resolved; `lora_manager` gives each step's
        per-token adapters (None: base model only)."""
        self.model = model
        self.lora_manager = lora_manager
        self.cfg = cfg
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.max_model_len: int = config.max_model_len  # type: ignore[assignment]
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graphs: dict[int, Any] = {}
        # the CPU engine's own machinery (weight layouts, threads per step, decode K/V kept dense)
        self.cpu = CpuBackend(model, cfg.num_hidden_layers, config, dtype) if device.type == "cpu" else None
        self.num_blocks = self._decide_num_blocks()
        self._allocate_kv_cache(self.num_blocks)
        if device.type == "cuda" and not config.enforce_eager:
            try:
                self._capture_graphs()
            except Exception as e:  # pragma: no cover - a model op that cannot be captured
                log.warning("CUDA graph capture failed (%s); decoding eagerly. enforce_eager=True skips "
                            "the attempt", e)
                self.graphs = {}
                torch.cuda.synchronize(device)

    # --- KV cache --------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        c = self.cfg
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * c.num_hidden_layers * self.block_size * c.num_key_value_heads * c.head_dim * elem

    def _kv_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        return (num_blocks, self.block_size, self.cfg.num_key_value_heads, self.cfg.head_dim)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        shape = self._kv_shape(num_blocks)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(self.cfg.num_hidden_layers)
        ]

    def _decide_num_blocks(self) -> int:
        tokens = self.config.kv_cache_tokens
        if self.device.type != "cuda" or tokens:
            tokens = tokens or max(4096, 2 * self.max_model_len)
            return max(1, -(-tokens // self.block_size))
        return self._profile_cuda(self.config.gpu_memory_utilization)

    def _profile_cuda(self, util: float) -> int:  # pragma: no cover - needs a GPU
        """Blocks that fit in `util` of the GPU after a warm-up forward of a full token budget."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        self._allocate_kv_cache(-(-n // self.block_size))
        self._warmup(n)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_allocated(self.device)
        budget = total * util - peak - used_by_others
        num_blocks = int(budget // self.bytes_per_block)
        if num_blocks < self.max_blocks_per_seq:
            raise RuntimeError(
                f"not enough GPU memory for the KV cache: {budget / 2**30:.2f} GiB left after the weights and "
                f"activations (peak {peak / 2**30:.2f} GiB) holds {max(num_blocks, 0)} blocks, one sequence of "
                f"max_model_len={self.max_model_len} needs {self.max_blocks_per_seq}; raise "
                "gpu_memory_utilization, lower max_model_len / max_num_batched_tokens, or use a bigger GPU"
            )
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                 num_blocks * self.bytes_per_block / 2**30)
        return num_blocks

    @torch.inference_mode()
    def _warmup(self, n: int) -> None:  # pragma: no cover - needs a GPU
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, dtype=torch.long, device=self.device)
        nb = -(-n // self.block_size)
        ctx = ForwardContext(
            is_prefill=True,
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            context_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(nb, dtype=torch.int32, device=self.device)[None],
            slot_mapping=torch.arange(n, dtype=torch.long, device=self.device),
            max_seqlen_q=n, max_context_len=n, kv_caches=self.kv_caches,
        )
        hidden = self.model(ids, pos, ctx)
        self.model.compute_logits(hidden[-1:])

    # --- batch building --------------------------------------------------------------
    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, ForwardContext, list[int]]:
        """Flatten a step into (input_ids, positions, ctx, indices of the positions to sample).

        Runs every step, so it is plain list work and two tensor constructions: the int64
        vectors (ids | positions | slots) and the int32 ones (cu_seqlens | context lens |
        block tables) are each built from one flat list and handed out as views.
        """
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx_lens: list[int] = []
        sample_idx: list[int] = []
        width = 0
        max_q = 0
        total = 0
        for item in batch:
            seq, n = item.seq, item.num_tokens
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            tokens = seq.token_ids
            if n == 1:  # decode: one token
                ids.append(tokens[start])
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids += tokens[start:end]
                pos += range(start, end)
                slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            total += n
            cu.append(total)
            ctx_lens.append(end)
            if item.samples:
                sample_idx.append(total - 1)
            if len(table) > width:
                width = len(table)
            if n > max_q:
                max_q = n
        b = len(batch)
        flat_tables: list[int] = []
        for item in batch:
            table = item.seq.block_table
            flat_tables += table
            if len(table) < width:
                flat_tables += [-1] * (width - len(table))
        dev = self.device
        i64 = torch.tensor(ids + pos + slots, dtype=torch.long, device=dev)
        i32 = torch.tensor(cu + ctx_lens + flat_tables, dtype=torch.int32, device=dev)
        ctx = ForwardContext(
            is_prefill=max_q > 1,
            cu_seqlens_q=i32[:b + 1],
            context_lens=i32[b + 1:2 * b + 1],
            block_tables=i32[2 * b + 1:].view(b, width),
            slot_mapping=i64[2 * total:],
            max_seqlen_q=max_q,
            max_context_len=max(ctx_lens),
            kv_caches=self.kv_caches,
        )
        if self.lora_manager is not None:
            ctx.lora = self.lora_manager.build_batch((item.seq.lora_name, item.num_tokens) for item in batch)
        return i64[:total], i64[total:2 * total], ctx, sample_idx

    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor | None:
        """Run one step; return fp32 logits [num sampling seqs, V] (None when none samples)."""
        if self.cpu is None:
            return self._run(batch)
        with self.cpu.step(batch):
            return self._run(batch)

    @torch.inference_mode()
    def _run(self, batch: list[ScheduledSeq]) -> torch.Tensor | None:
        input_ids, positions, ctx, sample_idx = self.prepare(batch)
        graph_bs = self._graph_batch_size(ctx, len(batch))
        if graph_bs is not None:  # pragma: no cover - needs a GPU
            hidden = self._replay(graph_bs, input_ids, positions, ctx)
        else:
            hidden = self.model(input_ids, positions, ctx)
        if not sample_idx:
            return None
        if len(sample_idx) < hidden.shape[0]:  # else every row samples (decode): no gather
            hidden = hidden.index_select(0, torch.tensor(sample_idx, dtype=torch.long, device=hidden.device))
        return self.model.compute_logits(hidden).float()

    # --- CUDA graphs (decode only) -----------------------------------------------------
    # Base-only decode steps replay `graphs`; decode steps with adapters replay `lora_graphs`,
    # captured per batch size on first use (adapters load while serving) over a
    # static `LoRABatch` whose slot buffer `g_lora_slots` each replay overwrites in place.
    # Adapter swaps copy into the preallocated slot stacks, so graphs keep reading the right
    # addresses; only an adapter that allocates a site no earlier one touched (new buffers)
    # invalidates them (`_lora_layout`), and they are captured again.
    def _graph_batch_size(self, ctx: ForwardContext, n: int) -> int | None:
        if not self.graphs or ctx.is_prefill or (ctx.lora is not None and self._lora_graphs_off):
            return None
        return next((b for b in sorted(self.graphs) if b >= n), None)

    _lora_graphs_off = False  # set when a LoRA graph capture failed: such steps run eagerly

    def _lora_layout(self) -> tuple[bool, ...]:
        """Which LoRA sites hold device buffers: what a captured LoRA graph depends on."""
        mgr = self.lora_manager
        return () if mgr is None else tuple(site.allocated for site in mgr.sites)

    def _alloc_graph_buffers(self, max_bs: int) -> None:
        """The static inputs every captured graph reads (written in place before each replay)."""
        dev = self.device
        self.g_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_pos = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_slots = torch.full((max_bs,), -1, dtype=torch.long, device=dev)
        self.g_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.g_tables = torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.g_cu = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.g_lora_slots = torch.full((max_bs,), -1, dtype=torch.int32, device=dev)  # -1 = base model
        self.g_out: dict[int, torch.Tensor] = {}
        self.lora_graphs: dict[int, Any] = {}
        self.g_lora_out: dict[int, torch.Tensor] = {}
        self._lora_graph_layout: tuple[bool, ...] = ()
        self._graph_pool: Any = None

    @torch.inference_mode()
    def _capture_graphs(self) -> None:  # pragma: no cover - needs a GPU
        max_bs = min(self.config.max_num_seqs, GRAPH_BATCH_SIZES[-1])
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_bs]
        self._alloc_graph_buffers(max_bs)
        for b in reversed(sizes):
            self._capture_one(b, lora=False)
        torch.cuda.synchronize(self.device)
        log.info("captured CUDA graphs for decode batch sizes %s", sizes)

    def _capture_one(self, b: int, lora: bool) -> None:  # pragma: no cover - needs a GPU
        """Warm up (Triton compiles, allocations), then record one decode step of `b` rows."""
        self._fill_graph_inputs(0, None, None, None)
        self.model(self.g_ids[:b], self.g_pos[:b], self._graph_ctx(b, lora))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self.model(self.g_ids[:b], self.g_pos[:b], self._graph_ctx(b, lora))
        self._graph_pool = graph.pool()
        (self.lora_graphs if lora else self.graphs)[b] = graph
        (self.g_lora_out if lora else self.g_out)[b] = out

    def _lora_graph(self, b: int) -> Any | None:  # pragma: no cover - needs a GPU
        """Batch size `b`'s LoRA decode graph, captured now if missing or stale; None = run eagerly."""
        layout = self._lora_layout()
        if layout != self._lora_graph_layout:
            self.lora_graphs.clear()
            self.g_lora_out.clear()
            self._lora_graph_layout = layout
        if b not in self.lora_graphs:
            try:
                with torch.inference_mode():
                    self._capture_one(b, lora=True)
                torch.cuda.synchronize(self.device)
                log.info("captured the CUDA graph for LoRA decode steps of batch size %d", b)
            except Exception as e:  # a LoRA op that cannot be captured: stay correct, decode eagerly
                log.warning("CUDA graph capture of a LoRA decode step failed (%s); LoRA steps run eagerly", e)
                self._lora_graphs_off = True
                self.lora_graphs.clear()
                torch.cuda.synchronize(self.device)
                return None
        return self.lora_graphs[b]

    def _graph_ctx(self, b: int, lora: bool = False) -> ForwardContext:
        """The context a graph is captured with: views of the static buffers (LoRA: a static batch)."""
        from hubdeploy.serving.lora.batch import static_lora_batch

        mgr = self.lora_manager
        return ForwardContext(
            is_prefill=False, cu_seqlens_q=self.g_cu[:b + 1], context_lens=self.g_lens[:b],
            block_tables=self.g_tables[:b], slot_mapping=self.g_slots[:b], max_seqlen_q=1,
            max_context_len=self.max_model_len, kv_caches=self.kv_caches,
            lora=static_lora_batch(self.g_lora_slots[:b], mgr.max_loras) if lora and mgr is not None else None,
        )

    def _fill_graph_inputs(self, n: int, ids: torch.Tensor | None, pos: torch.Tensor | None,
                           ctx: ForwardContext | None) -> None:
        """Write a step's `n` rows into the static buffers; the padding rows read slot -1 (no K/V
        store), context 1, block 0 and no adapter. n = 0 leaves only that neutral state."""
        self.g_ids.zero_(); self.g_pos.zero_(); self.g_slots.fill_(-1); self.g_lens.fill_(1); self.g_tables.zero_()
        self.g_lora_slots.fill_(-1)
        if n == 0 or ctx is None:
            return
        self.g_ids[:n] = ids
        self.g_pos[:n] = pos
        self.g_slots[:n] = ctx.slot_mapping
        self.g_lens[:n] = ctx.context_lens
        w = ctx.block_tables.shape[1]
        self.g_tables[:n, :w] = ctx.block_tables.clamp(min=0)
        if ctx.lora is not None:
            self.g_lora_slots[:n] = ctx.lora.token_slots

    def _replay(self, b: int, ids: torch.Tensor, pos: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # pragma: no cover
        graph, out = self.graphs[b], self.g_out[b]
        if ctx.lora is not None:
            graph = self._lora_graph(b)
            if graph is None:
                return self.model(ids, pos, ctx)
            out = self.g_lora_out[b]
        n = ids.shape[0]
        self._fill_graph_inputs(n, ids, pos, ctx)
        graph.replay()
        return out[:n]
