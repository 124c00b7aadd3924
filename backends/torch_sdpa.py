"""RoPE in PyTorch (as timm's `apply_rot_embed_cat` does it), then `F.scaled_dot_product_attention`.

PyTorch picks the SDPA kernel (flash, cuDNN, memory-efficient or math); gradients by torch autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnhub.rope import CosSinTable, apply_rope


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: CosSinTable | None, scale: float
) -> torch.Tensor:
    """q: [B, H, N, D], k, v: [B, H, N_kv, D] -> o: [B, H, N, D] in q's dtype."""
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
