"""The Hopper dK/dV kernel of triton_fa_rope's split backward, written in Gluon (`gluon_kernels.bwd_dkdv_kernel`):
which calls take it and its launch.

The Triton dK/dV kernel streams 32-query blocks past 128 keys in one warpgroup; Triton schedules its five products
as it can. This kernel keeps a 128-key block of the (rotated) K and V in shared memory, streams the rotated Q and
dO through a TMA ring (64 queries per step, the next two in flight) and feeds each warpgroup's wgmma from shared
memory and, for P^T and dS^T, from registers; dK is rotated back (R^T) in the epilogue. The delta pass and the dQ
kernel stay Triton's. Deterministic like them: no atomics, each key block's sums in one order.

Only `launch.backward` calls it (split path, from the config table's `gluon_bwd_from_n` tokens on), for the
calls it can take (`dkdv` returns False otherwise): no key padding mask, equal head counts, N_Q = N_KV,
interleaved RoPE with one table (or one per head) or none, bf16/fp16, D = 64, TMA-readable q, k, v, dO and dense
channels in dK, dV. Gluon has no interpreter: the GPU parity tests and the offline sm_90 compile check cover it.
"""

from __future__ import annotations

import torch
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attnhub.backends.triton_fa_rope.configs import KernelConfig
from attnhub.backends.triton_fa_rope.gluon_fwd import HEAD_D, _smem_layout, _tma_strides
from attnhub.backends.triton_fa_rope.gluon_kernels import gluon_dkdv_kernel, gluon_dq_kernel


def takes(q, k, v, do, rope, *grads) -> bool:
    """Whether the kernels can take this backward: q, k (rotated), v, do: [B, H, N, D]; grads: where gradients go."""
    if q.dtype not in (torch.bfloat16, torch.float16) or not k.dtype == v.dtype == do.dtype == q.dtype:
        return False
    if q.shape[-1] != HEAD_D or not q.shape == k.shape == v.shape == do.shape:
        return False
    if rope is not None and (rope.layout != "interleaved" or rope.cos.dim() == 4):
        return False
    if any(g.stride(-1) != 1 for g in grads):
        return False
    tensors = (q, k, v, do)
    return all(_tma_strides(t) for t in tensors) and all(t.data_ptr() % 16 == 0 for t in tensors)


def _desc(t: torch.Tensor, rows: int):
    """A TMA descriptor reading t [B, H, N, D] as the [B, N, H, D] tensor it is in memory, blocks of `rows`."""
    B, H, N, D = t.shape
    s = t.stride()
    return TensorDescriptor(t, [B, N, H, D], [s[0], s[2], s[1], s[3]], [1, rows, 1, D], _smem_layout(rows, t.dtype))


def tail_rows(N: int, block_m: int) -> int:
    """Rows of the last query block as the kernel runs it (0: a whole block): the remainder N % block_m rounded up
    to 16 or 32 when that is narrower than the block (wgmma's N in steps that keep the layouts simple)."""
    rem = N % block_m
    for rows in (16, 32):
        if 0 < rem <= rows < block_m:
            return rows
    return 0


def _check(name: str, cfg: KernelConfig, resident: int, streamed: int) -> None:
    if resident != 16 * cfg.num_warps or cfg.num_stages < 2 or streamed not in (64, 128):
        raise ValueError(f"triton_fa_rope: {name} {cfg} needs its resident rows = 16 * num_warps (a warpgroup's 64 "
                         "rows per 4 warps), streamed rows 64 or 128 and num_stages >= 2")


def dkdv(q, k, v, do, lse, delta, dk, dv, rope, cos, sin, stab_h, stab_n, P, qk_scale, scale, cfg: KernelConfig,
         narrow_tail: bool, launch) -> None:
    """dk, dv <- the gradients w.r.t. k and v (dk rotated back with `rope`), from the rotated q, k, the output
    gradient do, lse and delta [B*H, N] fp32 (base 2), for a call `takes` accepts. cos, sin: the tables as the
    Triton kernels read them; qk_scale: scale * log2(e); cfg: (queries per step, keys per program = 16 *
    num_warps, num_warps, query/dO buffers[, maxnreg]); narrow_tail: the last query block only as wide as
    `tail_rows` says."""
    _check("gluon_dkdv", cfg, cfg.block_n, cfg.block_m)
    B, H, N, D = q.shape
    n_kblocks = -(-N // cfg.block_n)
    args = (_desc(q, cfg.block_m), _desc(k, cfg.block_n), _desc(v, cfg.block_n), _desc(do, cfg.block_m), lse, delta,
            dk, dv, cos, sin, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            stab_h, stab_n, H, N, P, n_kblocks, qk_scale, scale)
    launch(gluon_dkdv_kernel, (n_kblocks * B * H,), args, cfg.num_warps, 1, **cfg.options(), ROPE=rope is not None,
           STAGES=cfg.num_stages, TAIL_M=tail_rows(N, cfg.block_m) if narrow_tail else 0)


def dq(q, k, v, do, lse, delta, dq, rope, cos, sin, stab_h, stab_n, P, qk_scale, scale, cfg: KernelConfig,
       narrow_tail: bool, launch) -> None:
    """dq <- the gradient w.r.t. q (rotated back with `rope`), as `dkdv`; cfg: (queries per program = 16 *
    num_warps, keys per step, num_warps, K/V buffers[, maxnreg]); narrow_tail: the last key block only as wide
    as `tail_rows` says."""
    _check("gluon_dq", cfg, cfg.block_m, cfg.block_n)
    B, H, N, D = q.shape
    n_qblocks = -(-N // cfg.block_m)
    args = (_desc(q, cfg.block_m), _desc(k, cfg.block_n), _desc(v, cfg.block_n), _desc(do, cfg.block_m), lse, delta,
            dq, cos, sin, dq.stride(0), dq.stride(1), dq.stride(2), stab_h, stab_n, H, N, P, n_qblocks, qk_scale,
            scale)
    launch(gluon_dq_kernel, (n_qblocks * B * H,), args, cfg.num_warps, 1, **cfg.options(), ROPE=rope is not None,
           STAGES=cfg.num_stages, TAIL_N=tail_rows(N, cfg.block_n) if narrow_tail else 0)
