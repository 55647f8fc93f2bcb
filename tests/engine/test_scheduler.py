"""Continuous batching decisions: budgets, chunked prefill, priority, preemption, abort."""

from engine.kv_cache import KVCacheManager
from engine.scheduler import Scheduler, Sequence, Status
from protocol.engine_api import SamplingParams


def make(kv_blocks=64, block_size=4, **kw):
    return Scheduler(KVCacheManager(kv_blocks, block_size), **kw)


def seq(rid, n_prompt, priority=0, start=0):
    return Sequence(rid, 0, list(range(start, start + n_prompt)), SamplingParams(max_tokens=100), priority)


def step(s: Scheduler, sample_token=1):
    """Run one scheduling step as the engine would: advance, then append a token to sampling chunks."""
    out = s.schedule()
    s.advance(out.chunks)
    for c in out.chunks:
        if c.samples:
            c.seq.output_token_ids.append(sample_token)
    return out


def test_decode_and_chunked_prefill_share_the_budget():
    s = make(max_num_batched_tokens=8)
    a = seq("a", 3)
    s.add(a)
    out = step(s)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 3)]
    b = seq("b", 20, start=100)
    s.add(b)
    out = step(s)
    # a decodes one token; b gets the remaining 7 tokens of its prompt, no sample yet
    assert [(c.seq.request_id, c.num_tokens, c.samples) for c in out.chunks] == [("a", 1, True), ("b", 7, False)]
    out = step(s)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 7)]
    out = step(s)
    assert [(c.seq.request_id, c.num_tokens, c.samples) for c in out.chunks] == [("a", 1, True), ("b", 6, True)]
    assert b.output_token_ids == [1]


def test_waiting_order_is_priority_then_arrival():
    s = make(max_num_batched_tokens=4)
    late_urgent = seq("urgent", 4, priority=-1)
    s.add(seq("first", 4))
    s.add(seq("second", 4))
    s.add(late_urgent)
    assert [c.seq.request_id for c in step(s).chunks] == ["urgent"]


def test_max_num_seqs_caps_the_batch():
    s = make(max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        s.add(seq(str(i), 2, start=10 * i))
    out = step(s)
    assert len(out.chunks) == 2
    assert s.num_waiting == 1


def test_preemption_by_recompute_keeps_outputs():
    # 4 blocks of 2 tokens: two sequences of 3 prompt tokens each need 2 blocks, then a third block each.
    s = make(kv_blocks=4, block_size=2, max_num_batched_tokens=100)
    a, b = seq("a", 3), seq("b", 3, start=50)
    s.add(a)
    s.add(b)
    step(s)  # both prefilled: 2 blocks each, one output token each
    step(s)  # token 4 of each still fits in 2 blocks
    out = step(s)  # a needs a 3rd block: b (later arrival) is preempted
    assert out.preempted == [b]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0
    assert b.output_token_ids == [1, 1]
    assert s.num_preemptions == 1
    s.finish(a)
    out = step(s)  # b comes back: its first block is still cached, the rest is recomputed
    assert [(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks] == [("b", 2, 3, True)]
    assert b.output_token_ids == [1, 1, 1]


def test_finish_frees_blocks_immediately():
    s = make(kv_blocks=8, block_size=4)
    a = seq("a", 10)
    s.add(a)
    step(s)
    assert s.kv.pool.num_free_blocks == 5
    s.finish(a)
    assert s.kv.pool.num_free_blocks == 8
    assert not s.has_work()


def test_abort_of_waiting_sequence_is_skipped():
    s = make()
    a, b = seq("a", 3), seq("b", 3, start=9)
    s.add(a)
    s.add(b)
    s.finish(a)
    assert [c.seq.request_id for c in step(s).chunks] == ["b"]


def test_prefix_hit_reported_as_cached_tokens():
    s = make(block_size=4)
    a = seq("a", 13)
    s.add(a)
    step(s)
    b = seq("b", 13)
    s.add(b)
    out = step(s)
    chunk_b = [c for c in out.chunks if c.seq is b][0]
    assert b.num_cached_tokens == 12
    assert (chunk_b.start, chunk_b.num_tokens) == (12, 1)
