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
    assert [(c.seq.request_id, c.num_tokens, c.samples) for c in out.chunks] == [
        ("a", 1, True),
        ("b", 7, False),
    ]
    out = step(s)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 7)]
    out = step(s)
    assert [(c.seq.request_id, c.num_tokens, c.samples) for c in out.chunks] == [
        ("a", 1, True),
        ("b", 6, True),
    ]
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


def test_decodes_are_served_before_an_earlier_sequence_still_prefilling():
    s = make(max_num_batched_tokens=8, long_prefill_token_threshold=6)
    long, short = seq("long", 30), seq("short", 2, start=100)
    s.add(long)
    s.add(short)
    out = step(s)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("long", 6), ("short", 2)]
    out = step(s)
    # short arrived later but only needs one token: it goes first, long's chunk takes the rest
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("short", 1), ("long", 6)]
    s.max_num_batched_tokens = 4
    out = step(s)
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("short", 1), ("long", 3)]


def test_samples_admitted_together_share_the_prompt_blocks_in_the_same_step():
    s = make(block_size=4)
    prompt = list(range(10))
    samples = [Sequence("r", i, prompt, SamplingParams(), arrival=0) for i in range(3)]
    for sample in samples:
        s.add(sample)
    out = step(s)
    # sample 0 computes the prompt; the others attach to the 2 full blocks it fills in this step
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 10), (8, 2), (8, 2)]
    tables = [s.kv.block_ids(sample.seq_id) for sample in samples]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3  # each writes its own partial block
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (30, 16)


def test_prefix_stats_count_a_sequence_once_however_long_it_waits():
    s = make(kv_blocks=3, block_size=4)
    first, second = seq("a", 8), seq("b", 8, start=50)
    s.add(first)
    s.add(second)
    step(s)  # a holds 2 blocks; b (2 blocks) does not fit and waits
    step(s)
    assert second.status is Status.WAITING
    assert s.prefix_cache_queries == 8
    s.finish(first)
    step(s)
    assert s.prefix_cache_queries == 16 and second.status is Status.RUNNING


def test_a_sequence_that_skips_the_cache_recomputes_its_prompt():
    s = make(block_size=4)
    a = seq("a", 9)
    s.add(a)
    step(s)
    b = seq("b", 9)
    b.read_prefix_cache = False
    s.add(b)
    out = step(s)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 9, 1), ("b", 0, 9)]
    assert b.num_cached_tokens == 0
