"""reshape_and_cache writes each token at its flat slot, skips slot -1, and leaves every other row alone."""

import pytest
import torch

from kernels import allocate_kv_cache, slot_mapping
from kernels.torch_ops.cache import reshape_and_cache as torch_reshape_and_cache
from kernels.triton_ops.cache import reshape_and_cache as triton_reshape_and_cache

IMPLEMENTATIONS = {"torch": torch_reshape_and_cache, "triton": triton_reshape_and_cache}


def _case(num_kv_heads, head_dim, block_size, dtype, with_padding):
    generator = torch.Generator().manual_seed(0)
    key_cache, value_cache = allocate_kv_cache(6, block_size, num_kv_heads, head_dim, dtype)
    # Two sequences: one continuing into a partially filled block, one starting fresh; plus padding.
    slots = slot_mapping([4, 1], range(block_size - 2, block_size + 3), block_size)
    slots += slot_mapping([0, 5], range(0, 3), block_size)
    if with_padding:
        slots = [-1, *slots[:4], -1, *slots[4:], -1]
    num_tokens = len(slots)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    return key, value, key_cache, value_cache, torch.tensor(slots, dtype=torch.int64)


def _expected(key, value, key_cache, value_cache, slots):
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    block_size = key_cache.shape[1]
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            key_cache[slot // block_size, slot % block_size] = key[token]
            value_cache[slot // block_size, slot % block_size] = value[token]
    return key_cache, value_cache


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size"), [(3, 64, 16), (2, 8, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_padding", [False, True])
def test_tokens_land_at_their_slots(implementation, num_kv_heads, head_dim, block_size, dtype, with_padding):
    key, value, key_cache, value_cache, slots = _case(num_kv_heads, head_dim, block_size, dtype, with_padding)
    expected_keys, expected_values = _expected(key, value, key_cache, value_cache, slots)
    IMPLEMENTATIONS[implementation](key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_keys)
    assert torch.equal(value_cache, expected_values)


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_flat_key_views_of_a_fused_projection_and_int32_slots(implementation):
    key, value, key_cache, value_cache, slots = _case(3, 64, 16, torch.float32, True)
    fused = torch.cat([key.view(len(slots), -1), value.view(len(slots), -1)], dim=1)
    flat_key, flat_value = fused[:, : 3 * 64], fused[:, 3 * 64 :]
    expected_keys, expected_values = _expected(key, value, key_cache, value_cache, slots)
    IMPLEMENTATIONS[implementation](flat_key, flat_value, key_cache, value_cache, slots.to(torch.int32))
    assert torch.equal(key_cache, expected_keys)
    assert torch.equal(value_cache, expected_values)


def test_slot_mapping_follows_the_block_table():
    assert slot_mapping([7, 2], range(0, 6), 4) == [28, 29, 30, 31, 8, 9]


def test_allocated_caches_are_zeroed_and_shaped_by_the_layout():
    key_cache, value_cache = allocate_kv_cache(3, 16, 2, 8, torch.bfloat16)
    assert key_cache.shape == value_cache.shape == (3, 16, 2, 8)
    assert key_cache.dtype == torch.bfloat16
    assert not key_cache.any() and not value_cache.any()
