"""The reference backend: scores, softmax and weighted sum in plain PyTorch.

Computes in float64 for float64 inputs and in float32 otherwise, then casts back; gradients by torch autograd.
"""

from __future__ import annotations

import torch

from attnhub.rope import CosSinTable, apply_rope


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: CosSinTable | None, scale: float
) -> torch.Tensor:
    """q: [B, H, N, D], k, v: [B, H, N_kv, D] -> o: [B, H, N, D] in q's dtype."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, dtype = q.to(compute), k.to(compute), v.to(compute), q.dtype
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, H, N, N_kv]
    return torch.matmul(scores.softmax(dim=-1), v).to(dtype)
