"""Block accounting of the paged KV cache: allocation, prefix hits, eviction order, immediate release."""

from engine.kv_cache import KVCacheManager


def test_allocate_grows_table_by_whole_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.start("a", list(range(10))) == 0
    assert kv.allocate("a", 10)
    assert len(kv.block_ids("a")) == 3
    assert kv.allocate("a", 12)  # still fits in 3 blocks
    assert len(kv.block_ids("a")) == 3
    assert kv.allocate("a", 13)
    assert len(kv.block_ids("a")) == 4
    assert kv.pool.num_free_blocks == 4


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    kv.start("a", list(range(6)))
    assert not kv.allocate("a", 9)
    assert kv.block_ids("a") == []
    assert kv.pool.num_free_blocks == 2


def test_shared_prefix_is_hit_after_commit():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks
    kv.start("a", prompt)
    kv.allocate("a", len(prompt))
    kv.commit("a", prompt, len(prompt))
    other = prompt[:12] + [7, 8, 9]
    hit = kv.start("b", other)
    assert hit == 12
    assert kv.block_ids("b")[:3] == kv.block_ids("a")[:3]


def test_full_hit_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(8))
    kv.start("a", prompt)
    kv.allocate("a", 8)
    kv.commit("a", prompt, 8)
    assert kv.start("b", prompt) == 4  # the last block is recomputed for the final token's logits


def test_salt_separates_caches():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(9))
    kv.start("a", prompt, salt="x")
    kv.allocate("a", 9)
    kv.commit("a", prompt, 9)
    assert kv.start("b", prompt, salt="y") == 0
    assert kv.start("c", prompt, salt="x") == 8


def test_free_releases_at_once_and_blocks_stay_hittable_until_reused():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    prompt = list(range(9))
    kv.start("a", prompt)
    kv.allocate("a", 9)
    kv.commit("a", prompt, 9)
    kv.free("a")
    assert kv.pool.num_free_blocks == 4
    assert kv.pool.usage() == 0.0
    assert kv.start("b", prompt) == 8  # cached blocks survive the free
    kv.free("b")
    # Fill the whole pool with something else: the cached blocks get evicted.
    kv.start("c", [50] * 16)
    assert kv.allocate("c", 16)
    kv.free("c")
    assert kv.start("d", prompt) == 0


def test_tail_blocks_are_evicted_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    prompt = list(range(7))  # 3 full blocks
    kv.start("a", prompt)
    kv.allocate("a", 7)
    kv.commit("a", prompt, 7)
    kv.free("a")
    kv.start("b", [99, 98, 97])
    kv.allocate("b", 3)  # takes the never-used block first, then evicts a's tail block
    kv.free("b")
    assert kv.start("c", prompt) == 4


def test_shared_blocks_are_reference_counted():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    kv.start("a", prompt)
    kv.allocate("a", 9)
    kv.commit("a", prompt, 9)
    kv.start("b", prompt)
    kv.allocate("b", 9)
    kv.free("a")
    # b still holds the two shared blocks: they must not return to the free queue.
    shared = set(kv.block_ids("b")[:2])
    assert all(kv.pool.blocks[i].ref_count == 1 for i in shared)
    assert kv.pool.num_free_blocks == 8 - 3


def _run_prompt(kv: KVCacheManager, seq_id: str, prompt: list[int], media=()) -> int:
    hit = kv.start(seq_id, prompt, media=media)
    kv.allocate(seq_id, len(prompt))
    kv.commit(seq_id, prompt, len(prompt))
    return hit


def test_media_hashes_key_the_blocks_that_hold_them():
    """Equal placeholder tokens with different images share only the blocks before the image."""
    kv = KVCacheManager(num_blocks=32, block_size=4)
    image = [9] * 8  # an image on positions 4..11 (blocks 1 and 2)
    prompt = [1, 2, 3, 4, *image, 5, 6, 7, 8, 0]  # 17 tokens: 4 full blocks
    assert _run_prompt(kv, "a", prompt, [(4, 12, b"cat")]) == 0
    assert _run_prompt(kv, "b", prompt, [(4, 12, b"dog")]) == 4  # block 0 only: blocks 1-3 chain from the image
    assert kv.block_ids("b")[0] == kv.block_ids("a")[0]
    assert not set(kv.block_ids("b")[1:]) & set(kv.block_ids("a"))
    assert _run_prompt(kv, "c", prompt, [(4, 12, b"cat")]) == 16  # the same image: every full block
    assert kv.block_ids("c")[:4] == kv.block_ids("a")[:4]
    assert _run_prompt(kv, "d", prompt) == 4  # no image item at all: the text's own blocks, not the image's


def test_media_hash_changes_every_block_it_overlaps_and_after():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    prompt = [9] * 6 + list(range(11))  # image on 0..5: blocks 0 and 1
    _run_prompt(kv, "a", prompt, [(0, 6, b"one")])
    assert _run_prompt(kv, "b", prompt, [(0, 6, b"two")]) == 0
