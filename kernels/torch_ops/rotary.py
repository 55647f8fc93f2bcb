"""Rotary position embedding applied from a precomputed cos/sin cache (see `kernels.rope`)."""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, is_neox: bool) -> torch.Tensor:
    """Rotate the first `rot_dim` dims of each head of `x` [tokens, heads*head_dim]; the rest pass through."""
    num_tokens = x.shape[0]
    heads = x.view(num_tokens, -1, head_dim)
    rot_dim = cos.shape[-1] * 2
    out = torch.empty_like(heads)
    if rot_dim < head_dim:
        out[..., rot_dim:] = heads[..., rot_dim:]
    if is_neox:
        # rotate_half: pairs are (i, i + rot_dim/2).
        x1, x2 = heads[..., : rot_dim // 2], heads[..., rot_dim // 2 : rot_dim]
        o1, o2 = out[..., : rot_dim // 2], out[..., rot_dim // 2 : rot_dim]
    else:
        # GPT-J style: pairs are (2i, 2i + 1).
        x1, x2 = heads[..., 0:rot_dim:2], heads[..., 1:rot_dim:2]
        o1, o2 = out[..., 0:rot_dim:2], out[..., 1:rot_dim:2]
    # Written straight into the strided halves of `out`: no temporaries beyond `out` itself.
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out.view(x.shape)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(q, k)` rotated by the angles of `positions`.

    q: [num_tokens, num_heads*head_dim], k: [num_tokens, num_kv_heads*head_dim] (or 3-d with the heads split
    out); cos_sin_cache: [max_position, rot_dim] holding cos in the first half and sin in the second.
    Computed in q's dtype, as HF does.
    """
    cos_sin = cos_sin_cache.index_select(0, positions.reshape(-1)).to(q.dtype)
    cos, sin = cos_sin.unsqueeze(1).chunk(2, dim=-1)
    q_flat, k_flat = q.reshape(q.shape[0], -1), k.reshape(k.shape[0], -1)
    q_out = _rotate(q_flat, cos, sin, head_dim, is_neox).view(q.shape)
    k_out = _rotate(k_flat, cos, sin, head_dim, is_neox).view(k.shape)
    return q_out, k_out
