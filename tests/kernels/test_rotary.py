"""Rotary embedding: the cos/sin cache against HF's rotary tables, the rotation against HF's
apply_rotary_pos_emb, and the triton kernel against the torch path."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kernels.rope import compute_cos_sin_cache
from kernels.torch_ops.rotary import rotary_embedding as torch_rotary
from kernels.triton_ops.rotary import rotary_embedding as triton_rotary
from tests.kernels.tolerances import tolerance

SCALINGS = {
    "default": (10000.0, None),
    "linear": (10000.0, {"rope_type": "linear", "factor": 4.0}),
    "llama3": (
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    ),
}
HEAD_DIM, MAX_POSITION = 64, 4096


def _hf_rotary(base, scaling):
    parameters = {"rope_type": "default", "rope_theta": base} | (scaling or {})
    config = LlamaConfig(
        hidden_size=9 * HEAD_DIM,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITION,
        rope_parameters=parameters,
    )
    return LlamaRotaryEmbedding(config)


def _qk(num_tokens, num_heads, num_kv_heads, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, num_heads * head_dim, generator=generator).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads * head_dim, generator=generator).to(dtype)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=generator)
    return positions, q, k


@pytest.mark.parametrize("scaling_name", list(SCALINGS))
def test_cache_matches_hf_rotary_tables(scaling_name):
    base, scaling = SCALINGS[scaling_name]
    cache = compute_cos_sin_cache(HEAD_DIM, MAX_POSITION, base, scaling)
    positions = torch.tensor([[0, 1, 7, 1000, 4095]])
    cos, sin = _hf_rotary(base, scaling)(torch.zeros(1), positions)
    half = HEAD_DIM // 2
    torch.testing.assert_close(cache[positions[0], :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[positions[0], half:], sin[0, :, :half], atol=1e-6, rtol=0)


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="yarn"):
        compute_cos_sin_cache(HEAD_DIM, 16, 10000.0, {"rope_type": "yarn", "factor": 4.0})


@pytest.mark.parametrize("scaling_name", list(SCALINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neox_rotation_matches_hf_apply_rotary_pos_emb(scaling_name, dtype):
    base, scaling = SCALINGS[scaling_name]
    positions, q, k = _qk(11, 9, 3, HEAD_DIM, dtype)
    cache = compute_cos_sin_cache(HEAD_DIM, MAX_POSITION, base, scaling)
    q_out, k_out = torch_rotary(positions, q, k, cache, HEAD_DIM, is_neox=True)

    cos, sin = _hf_rotary(base, scaling)(q, positions[None])
    heads = lambda x: x.view(1, x.shape[0], -1, HEAD_DIM).transpose(1, 2)  # noqa: E731
    q_hf, k_hf = apply_rotary_pos_emb(heads(q), heads(k), cos, sin)
    flat = lambda x: x.transpose(1, 2).reshape(x.shape[2], -1)  # noqa: E731
    exact = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2**-7}
    torch.testing.assert_close(q_out, flat(q_hf), **exact)
    torch.testing.assert_close(k_out, flat(k_hf), **exact)


def test_gptj_rotation_rotates_adjacent_pairs():
    positions, q, k = _qk(5, 2, 1, 8)
    cache = compute_cos_sin_cache(8, MAX_POSITION, 10000.0)
    q_out, k_out = torch_rotary(positions, q, k, cache, 8, is_neox=False)
    cos, sin = cache[positions, :4][:, None, :], cache[positions, 4:][:, None, :]
    for x, out in ((q, q_out), (k, k_out)):
        pairs = x.view(5, -1, 4, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
        expected = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
        torch.testing.assert_close(out, expected.view(5, -1))


def test_partial_rotary_leaves_the_tail_of_each_head_alone():
    positions, q, k = _qk(4, 2, 2, 16)
    cache = compute_cos_sin_cache(8, MAX_POSITION, 10000.0)  # rotate the first 8 of 16 dims
    q_out, k_out = torch_rotary(positions, q, k, cache, 16)
    full_q, _ = torch_rotary(positions, q.view(4, 2, 16)[..., :8].reshape(4, 16), k[:, :16], cache, 8)
    torch.testing.assert_close(q_out.view(4, 2, 16)[..., :8].reshape(4, 16), full_q)
    assert torch.equal(q_out.view(4, 2, 16)[..., 8:], q.view(4, 2, 16)[..., 8:])
    assert torch.equal(k_out.view(4, 2, 16)[..., 8:], k.view(4, 2, 16)[..., 8:])


def test_position_zero_is_the_identity_and_inputs_are_untouched():
    _, q, k = _qk(3, 9, 3, HEAD_DIM)
    q_before, k_before = q.clone(), k.clone()
    cache = compute_cos_sin_cache(HEAD_DIM, 16, 10000.0)
    q_out, k_out = torch_rotary(torch.zeros(3, dtype=torch.long), q, k, cache, HEAD_DIM)
    assert torch.equal(q_out, q) and torch.equal(k_out, k)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "rotary_dim"), [(9, 3, 64, 64), (4, 4, 32, 16)])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_matches_torch_path(num_heads, num_kv_heads, head_dim, rotary_dim, is_neox, dtype):
    positions, q, k = _qk(7, num_heads, num_kv_heads, head_dim, dtype)
    cache = compute_cos_sin_cache(rotary_dim, MAX_POSITION, 10000.0)
    got = triton_rotary(positions, q, k, cache, head_dim, is_neox)
    expected = torch_rotary(positions, q, k, cache, head_dim, is_neox)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, **tolerance(dtype))


def test_triton_kernel_reads_q_and_k_as_views_of_a_fused_qkv():
    positions, q, k = _qk(6, 9, 3, HEAD_DIM)
    qkv = torch.cat([q, k, torch.randn_like(k)], dim=1)
    q_view, k_view = qkv[:, : q.shape[1]], qkv[:, q.shape[1] : q.shape[1] + k.shape[1]]
    cache = compute_cos_sin_cache(HEAD_DIM, MAX_POSITION, 10000.0)
    got = triton_rotary(positions, q_view, k_view, cache, HEAD_DIM)
    expected = torch_rotary(positions, q, k, cache, HEAD_DIM)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
