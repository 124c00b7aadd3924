"""The reference backend: scores, softmax and weighted sum in plain PyTorch.

Computes in float64 for float64 inputs and in float32 otherwise, then casts back; gradients by torch autograd.
Grouped k/v heads are computed by viewing q as [B, H_kv, H / H_kv, N, D] against k/v [B, H_kv, 1, N_kv, D]
(no repeated k/v). With a key padding mask, a sample with no valid key attends to all its keys (finite
intermediates, so no NaN reaches any gradient) and its output is then set to zero (zero gradients).
"""

from __future__ import annotations

import torch

from attnhub.rope import CosSinTable, apply_rope_qk


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: CosSinTable | None,
    scale: float,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [B, H, N, D], k, v: [B, H_kv, N_kv, D], key_padding_mask: bool [B, N_kv] -> o: [B, H, N, D] in q's
    dtype."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, dtype = q.to(compute), k.to(compute), v.to(compute), q.dtype
    if rope is not None:
        q, k = apply_rope_qk(q, k, rope)
    B, H, N, D = q.shape
    H_kv = k.shape[1]
    q = q.reshape(B, H_kv, H // H_kv, N, D)  # query head h = g * (H / H_kv) + i uses k/v head g
    k, v = k.unsqueeze(2), v.unsqueeze(2)  # [B, H_kv, 1, N_kv, D]
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, H_kv, H / H_kv, N, N_kv]
    if key_padding_mask is not None:
        valid = key_padding_mask.any(-1)  # [B]: the sample has a key to attend to
        keep = key_padding_mask | ~valid[:, None]
        scores = scores.masked_fill(~keep[:, None, None, None, :], float("-inf"))
    o = torch.matmul(scores.softmax(dim=-1), v).reshape(B, H, N, D)
    if key_padding_mask is not None:
        o = torch.where(valid[:, None, None, None], o, 0.0)
    return o.to(dtype)
