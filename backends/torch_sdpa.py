"""RoPE in PyTorch (as timm's `apply_rot_embed_cat` does it), then `F.scaled_dot_product_attention`.

PyTorch picks the SDPA kernel (flash, cuDNN, memory-efficient or math); gradients by torch autograd. Grouped k/v
heads go through SDPA's own `enable_gqa` (torch >= 2.5; older torch repeats k/v), a key padding mask through
its bool `attn_mask` broadcast as [B, 1, 1, N_kv] (no [B, H, N, N_kv] mask is built).

Non-finite inputs: a query row with an inf or NaN makes that row of o NaN, as in `math` and `triton_fa_rope`.
PyTorch's SDPA alone returns 0 for a row whose scores are all -inf (its convention for fully masked rows), and on
CPU in float16/bfloat16 sometimes also for rows mixing +inf and -inf; adding `0 * rowsum(q)` (NaN exactly when the
row of q is not finite, else 0; outside autograd: its gradient would be zero) restores the common contract at the
cost of one reduction over q and one add.
Key padding: a sample with no valid key attends to all its keys inside SDPA (no fully masked row, whose handling
differs between SDPA kernels and can put NaN into gradients) and its output is then set to zero, as in `math`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from attnhub.rope import CosSinTable, apply_rope_qk

_HAS_ENABLE_GQA = TorchVersion(torch.__version__) >= (2, 5)


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
    rowsum = q.detach().sum(-1, keepdim=True)  # [B, H, N, 1]: inf or NaN where the row of q is not finite
    if rope is not None:
        q, k = apply_rope_qk(q, k, rope)
    return torch.add(sdpa(q, k, v, scale, key_padding_mask), rowsum, alpha=0)  # o + 0 * rowsum


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
         key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention with grouped k/v heads and a key padding mask in attnhub's conventions (also
    the attention of triton_rope_sdpa): q: [B, H, N, D], k, v: [B, H_kv, N_kv, D], key_padding_mask: bool [B, N_kv]."""
    kwargs = {}
    if k.shape[1] != q.shape[1]:
        if _HAS_ENABLE_GQA:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    valid = None
    if key_padding_mask is not None:
        valid = key_padding_mask.any(-1)  # [B]
        kwargs["attn_mask"] = (key_padding_mask | ~valid[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, scale=scale, **kwargs)
    if valid is not None:
        o = torch.where(valid[:, None, None, None], o, 0.0)
    return o
