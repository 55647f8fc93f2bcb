"""copy_blocks copies whole blocks of every layer's caches (a forked beam's copy on write) and nothing else."""

import pytest
import torch

from kernels import allocate_kv_cache, use_backend
from kernels.kv_cache import copy_blocks


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_are_copied_in_every_layer_and_other_blocks_untouched(backend, dtype):
    generator = torch.Generator().manual_seed(0)
    caches = []
    for _ in range(3):
        key_cache, value_cache = allocate_kv_cache(6, 4, 2, 8, dtype)
        key_cache.copy_(torch.randn(key_cache.shape, generator=generator).to(dtype))
        value_cache.copy_(torch.randn(value_cache.shape, generator=generator).to(dtype))
        caches.append((key_cache, value_cache))
    before = [(k.clone(), v.clone()) for k, v in caches]
    with use_backend(backend):
        copy_blocks(caches, [(1, 4), (3, 0)])
    for (key, value), (old_key, old_value) in zip(caches, before, strict=True):
        for block, source in {0: 3, 1: 1, 2: 2, 3: 3, 4: 1, 5: 5}.items():
            assert torch.equal(key[block], old_key[source])
            assert torch.equal(value[block], old_value[source])


def test_no_pairs_is_a_no_op():
    caches = [allocate_kv_cache(2, 4, 1, 8)]
    copy_blocks(caches, [])
    assert not caches[0][0].any()
