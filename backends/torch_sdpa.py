"""RoPE in PyTorch (as timm's `apply_rot_embed_cat` does it), then `F.scaled_dot_product_attention`.

PyTorch picks the SDPA kernel (flash, cuDNN, memory-efficient or math); gradients by torch autograd.

Non-finite inputs: a query row with an inf or NaN makes that row of o NaN, as in `math` and `triton_fa_rope`.
PyTorch's SDPA alone returns 0 for a row whose scores are all -inf (its convention for fully masked rows), and on
CPU in float16/bfloat16 sometimes also for rows mixing +inf and -inf; adding `0 * rowsum(q)` (NaN exactly when the
row of q is not finite, else 0) restores the common contract at the cost of one reduction over q and one add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnhub.rope import CosSinTable, apply_rope


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: CosSinTable | None, scale: float
) -> torch.Tensor:
    """q: [B, H, N, D], k, v: [B, H, N_kv, D] -> o: [B, H, N, D] in q's dtype."""
    rowsum = q.sum(-1, keepdim=True)  # [B, H, N, 1]: inf or NaN where the row of q is not finite
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    return torch.add(F.scaled_dot_product_attention(q, k, v, scale=scale), rowsum, alpha=0)  # o + 0 * rowsum
