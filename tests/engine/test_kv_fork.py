"""Forked block tables: full blocks shared, the partial last block copied on first write, all freed."""

from engine.kv_cache import KVCacheManager


def _sequence(kv: KVCacheManager, seq_id: str, num_tokens: int) -> None:
    tokens = list(range(num_tokens))
    kv.start(seq_id, tokens)
    assert kv.allocate(seq_id, num_tokens)
    kv.commit(seq_id, tokens, num_tokens)


def test_fork_shares_every_block_without_copying_the_prefix():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    _sequence(kv, "p", 10)  # 2 full blocks + 2 tokens in a third
    free = kv.pool.num_free_blocks
    kv.fork("p", "c", 10)
    assert kv.block_ids("c") == kv.block_ids("p")
    assert kv.pool.num_free_blocks == free  # nothing allocated
    assert [b.ref_count for b in kv.table("p").blocks] == [2, 2, 2]


def test_first_writer_of_a_shared_partial_block_copies_it_the_last_writes_in_place():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    _sequence(kv, "p", 10)
    kv.fork("p", "a", 10)
    kv.fork("p", "b", 10)
    tail = kv.block_ids("p")[2]
    assert kv.allocate("a", 11)
    assert kv.allocate("p", 11)
    assert kv.allocate("b", 11)
    assert kv.block_ids("b")[2] == tail  # last one left holding it
    new_tails = {kv.block_ids("a")[2], kv.block_ids("p")[2]}
    assert tail not in new_tails and len(new_tails) == 2
    assert kv.take_copies() == [[(tail, kv.block_ids("a")[2]), (tail, kv.block_ids("p")[2])]]
    assert kv.take_copies() == []
    # full blocks stay shared
    assert kv.block_ids("a")[:2] == kv.block_ids("b")[:2] == kv.block_ids("p")[:2]


def test_fork_at_a_block_boundary_copies_nothing():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    _sequence(kv, "p", 8)
    kv.fork("p", "c", 8)
    assert kv.allocate("c", 9) and kv.allocate("p", 9)
    assert kv.take_copies() == []
    assert kv.block_ids("c")[:2] == kv.block_ids("p")[:2] and kv.block_ids("c")[2] != kv.block_ids("p")[2]


def test_pruned_sibling_means_no_copy():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    _sequence(kv, "p", 6)
    kv.fork("p", "c", 6)
    kv.free("p")
    assert kv.allocate("c", 7)
    assert kv.take_copies() == []


def test_copy_on_write_needs_a_free_block_and_fails_cleanly():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    _sequence(kv, "p", 6)
    kv.fork("p", "c", 6)
    assert not kv.allocate("c", 7)  # no block for the copy
    assert kv.block_ids("c") == kv.block_ids("p")


def test_freeing_every_fork_returns_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    _sequence(kv, "p", 6)
    for child in "abc":
        kv.fork("p", child, 6)
    kv.allocate("a", 7)
    for seq_id in "pabc":
        kv.free(seq_id)
    assert kv.pool.num_free_blocks == 8
    assert kv.take_copies() == []  # the copy into a's freed block is dropped


def test_copy_batches_never_write_a_block_another_copy_reads():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv._copies = [(1, 2), (3, 4), (5, 1), (2, 6)]
    assert kv.take_copies() == [[(1, 2), (3, 4)], [(5, 1), (2, 6)]]
