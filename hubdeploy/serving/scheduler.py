"""`Scheduler`: which sequences run this step and how many tokens each feeds.

Continuous batching with a per-step token budget (`max_num_batched_tokens`):
running sequences go first (decodes, then unfinished prefill chunks), and waiting ones are
admitted FCFS into what is left of the budget, their prompts chunked to fit, so a long
prompt never stalls the decodes. When the KV cache runs out, the most recently admitted
running sequence is preempted by recompute: its blocks are freed and it returns to the
front of the waiting queue with its output so far, to be prefilled again (the prefix cache
usually gives most of it back). After the forward, `postprocess` does the step's bookkeeping.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hubdeploy.serving.block_manager import BlockManager
from hubdeploy.serving.sequence import Sequence, SequenceStatus, TokenLogprob

if TYPE_CHECKING:
    from hubdeploy.serving.lora.manager import LoRAManager


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens fed this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """A token is sampled: this chunk reaches the sequence's end (read it before `postprocess`)."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
        lora_manager: LoRAManager | None = None,
    ) -> None:
        """`lora_manager`: admit an adapter's sequence once its adapter holds a device slot (None: base only)."""
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be at least 1")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.lora_manager = lora_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order (oldest first)
        self.num_preemptions = 0

    # --- queues ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence from whichever queue holds it and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq, True)

    @property
    def num_preempted_waiting(self) -> int:
        return sum(1 for s in self.waiting if s.num_preemptions > 0)

    def _free(self, seq: Sequence, finished: bool) -> None:
        """Its blocks back to the cache, its adapter unpinned (a finished seq stops using it)."""
        self.bm.free_seq(seq)
        if self.lora_manager is not None:
            self.lora_manager.release(seq, finished)

    def _lora_admit(self, mgr: LoRAManager, seq: Sequence) -> bool:
        """Pin `seq`'s adapter (False: wait); after an unload, drop the prefix cache (stale adapter K/V)."""
        if mgr.take_prefix_cache_stale():
            self.bm.reset_prefix_cache()
        return mgr.acquire(seq)

    # --- the step --------------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq, False)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        out: list[ScheduledSeq] = []
        preempted = False
        # decodes (one token left) first, then running prefills, each group oldest first
        # (a stable partition: the attribute reads are inlined, this loop runs every step)
        order = [s for s in self.running if len(s.token_ids) - s.num_computed_tokens <= 1]
        if len(order) < len(self.running):
            order += [s for s in self.running if len(s.token_ids) - s.num_computed_tokens > 1]
        bs = self.bm.block_size
        running = SequenceStatus.RUNNING
        for seq in order:
            if budget == 0:
                break
            if seq.status is not running:  # preempted while making room
                continue
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if -(-(seq.num_computed_tokens + n) // bs) <= len(seq.block_table):
                out.append(ScheduledSeq(seq, n))  # its blocks already hold the new tokens
                budget -= n
                continue
            while not self.bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                for j, item in enumerate(out):  # a victim already in this step's batch leaves it
                    if item.seq is victim:
                        budget += out.pop(j).num_tokens
                        break
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.bm.allocate(seq, seq.num_computed_tokens + n)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        # admit waiting sequences FCFS into the rest of the budget (not after a preemption:
        # the cache is full and they would be preempted straight away)
        lora_waiting: list[Sequence] = []  # their adapter has no device slot yet
        mgr = self.lora_manager
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # FCFS among adapter requests (no starvation), base requests may go ahead
            if mgr is not None and seq.lora_name is not None and (lora_waiting or not self._lora_admit(mgr, seq)):
                lora_waiting.append(self.waiting.popleft())
                continue
            looked_up = self.bm.allocate_prefix(seq) if not seq.block_table else (0, 0)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.bm.can_allocate(seq, seq.num_computed_tokens + n):
                # the engine guarantees max_model_len fits the cache, so a lone sequence always
                # fits: wait for running ones to finish, holding neither blocks nor an adapter slot
                self._free(seq, False)
                self.bm.uncount_lookup(looked_up)  # it is looked up again when admitted
                break
            self.waiting.popleft()
            self.bm.allocate(seq, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(lora_waiting))
        return out

    def postprocess(self, batch: list[ScheduledSeq], token_ids: list[int],
                    logprobs: list[TokenLogprob | None] | None = None) -> None:
        """After the forward: advance every chunk's computed tokens (full blocks join the prefix
        cache), append `token_ids` (one per chunk that `samples`, in batch order) and finish the
        sequences they stop."""
        sampled: list[Sequence] = []
        commit = self.bm.commit
        for item in batch:
            seq = item.seq
            if item.samples:
                sampled.append(seq)
            seq.num_computed_tokens += item.num_tokens
            commit(seq)
        for seq, tok, lp in zip(sampled, token_ids, logprobs or [None] * len(sampled)):
            seq.append_token(tok, lp)
            p, n = seq.params, seq.num_output_tokens
            if n >= p.min_tokens and ((not p.ignore_eos and tok in self.eos_token_ids) or tok in p.stop_token_ids):
                self.finish(seq, "stop")
            elif n >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
                self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a sequence finished (abort: from either queue) and free its blocks; again for a
        finished one, the reason changes (a stop string in the final flush outranks 'length')."""
        seq.finish(reason)
        self.remove(seq)
