"""Scheduler: token budget, chunked prefill, decodes never starved, preemption by recompute."""
from __future__ import annotations

from hubdeploy.serving.block_manager import BlockManager
from hubdeploy.serving.sampling_params import SamplingParams
from hubdeploy.serving.scheduler import ScheduledSeq, Scheduler
from hubdeploy.serving.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 16, caching: bool = False) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, caching), max_num_seqs, budget, max_model_len=256)


def seq(rid: str, n: int, start: int = 0) -> Sequence:
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=100))


def advance(sched: Scheduler, batch: list[ScheduledSeq], token: int = 7) -> None:
    """What the engine does after the forward pass (sampling a fixed token)."""
    sched.postprocess(batch, [token] * sum(item.samples for item in batch))


def test_budget_and_chunked_prefill() -> None:
    s = make(budget=16)
    long = seq("long", 40)
    s.add(long)
    sizes = []
    while long.num_output_tokens == 0:
        batch = s.schedule()
        assert sum(i.num_tokens for i in batch) <= 16
        sizes.append(batch[0].num_tokens)
        advance(s, batch)
    assert sizes == [16, 16, 8]
    assert long.num_computed_tokens == 40 and len(long.block_table) == 10


def test_decodes_run_every_step_while_a_long_prompt_prefills() -> None:
    s = make(budget=8)
    a = seq("a", 3)
    s.add(a)
    advance(s, s.schedule())  # a prefilled, has its first token
    big = seq("big", 30, start=100)
    s.add(big)
    steps = 0
    while big.num_output_tokens == 0:
        left = big.num_uncomputed_tokens
        batch = s.schedule()
        by_id = {i.seq.request_id: i.num_tokens for i in batch}
        assert by_id["a"] == 1, "the decode must be scheduled each step"
        assert by_id["big"] == min(7, left)  # the rest of the budget
        assert batch[0].seq is a  # decodes first
        advance(s, batch)
        steps += 1
    assert steps == 5 and a.num_output_tokens == 1 + steps


def test_max_num_seqs_caps_the_running_batch() -> None:
    s = make(max_num_seqs=2, budget=64)
    for i in range(4):
        s.add(seq(f"r{i}", 3, start=10 * i))
    batch = s.schedule()
    assert [i.seq.request_id for i in batch] == ["r0", "r1"]
    assert len(s.running) == 2 and len(s.waiting) == 2


def test_fcfs_admission_in_arrival_order() -> None:
    s = make(budget=10)
    for i, n in enumerate([6, 6, 2]):
        s.add(seq(f"r{i}", n, start=10 * i))
    batch = s.schedule()
    # r1 is chunked into the remaining 4 tokens; r2 waits its turn although it would fit
    assert [(i.seq.request_id, i.num_tokens) for i in batch] == [("r0", 6), ("r1", 4)]


def test_preemption_frees_blocks_and_requeues_at_the_front() -> None:
    s = make(num_blocks=4, budget=64)  # 16 tokens of cache
    a, b = seq("a", 7), seq("b", 7, start=50)
    s.add(a)
    s.add(b)
    advance(s, s.schedule())  # both prefilled: 2 blocks each, cache full
    assert s.bm.num_free_blocks == 0
    advance(s, s.schedule())  # 8 tokens each, still fits
    batch = s.schedule()  # both need a 3rd block: the newest (b) is preempted
    assert [i.seq.request_id for i in batch] == ["a"]
    assert s.num_preemptions == 1 and b.status == SequenceStatus.WAITING
    assert s.waiting[0] is b and b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_output_tokens == 2  # its output is kept and recomputed later
    advance(s, batch)
    s.finish(a, "length")
    assert s.bm.num_free_blocks == 4
    batch = s.schedule()
    assert [(i.seq.request_id, i.num_tokens) for i in batch] == [("b", 9)]  # prompt + 2 outputs
    assert batch[0].samples


def test_remove_frees_blocks_from_either_queue() -> None:
    s = make(num_blocks=8, budget=64)
    a, b = seq("a", 5), seq("b", 5)
    s.add(a)
    advance(s, s.schedule())
    s.add(b)
    s.remove(a)
    s.remove(b)
    assert not s.has_unfinished() and s.bm.num_free_blocks == 8


def test_waiting_for_room_does_not_inflate_prefix_counters() -> None:
    s = make(num_blocks=6, budget=64, caching=True)
    first = seq("first", 9)
    s.add(first)
    advance(s, s.schedule())
    s.finish(first, "stop")  # its 2 full blocks stay cached on the free list
    hog = seq("hog", 13, start=100)  # 4 blocks, 2 left: hog takes the uncached ones first
    s.add(hog)
    advance(s, s.schedule())
    again = Sequence("again", list(range(9)) + [200, 201, 202, 203], SamplingParams())  # 2 hits + 2 blocks
    s.add(again)
    for _ in range(3):
        batch = s.schedule()
        assert [i.seq.request_id for i in batch] == ["hog"]
        advance(s, batch)
    # only the lookups of first (2 misses) and hog (3 misses): again's retries were taken back
    assert s.bm.prefix_queries == 5 and s.bm.prefix_hits == 0
    assert s.waiting[0] is again and again.block_table == []


def test_a_preempted_decode_leaves_the_batch_it_was_scheduled_in() -> None:
    s = make(num_blocks=5, budget=64)
    a = seq("a", 6)  # admitted first: 2 blocks
    b = seq("b", 4, start=50)  # admitted second: 1 block, full after its prefill
    s.add(a)
    s.add(b)
    advance(s, s.schedule())
    # a keeps its prompt chunk running: make it a running prefill with 9 tokens left
    a.token_ids += list(range(100, 109))
    # b decodes (needs a 2nd block); a's chunk needs 4 blocks in all: only 1 is free after b's
    batch = s.schedule()
    ids = [i.seq.request_id for i in batch]
    assert "b" not in ids and b.status == SequenceStatus.WAITING and b.block_table == []
    assert ids == ["a"] and s.bm.num_free_blocks == 5 - len(a.block_table)
