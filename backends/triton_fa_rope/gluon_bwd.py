"""The Hopper kernels of triton_fa_rope's split backward, written in Gluon (`gluon_bwd_kernels`): which calls take
them, their plans and launches.

Triton's dK/dV kernel streams 32-query blocks past 128 keys in one warpgroup, its dQ kernel recomputes the scores
for 128 queries in two. These keep 64 keys (dK/dV) or 64 queries (dQ) of a head per warpgroup in shared memory,
stream the other side through a two-buffer TMA ring in 64-row blocks (the last one only as wide as its rows need:
`tail_rows`), and feed wgmma from shared memory and, for P^T / dS^T and dS, from registers; dK and dQ are rotated
back (R^T) in the epilogue. Small programs under a register cap run three (dK/dV) or four (dQ) CTAs per SM, so
one CTA's softmax hides behind another's MMAs. With `delta_in_dq` the dQ kernel computes delta (rowsum(o * dO))
of its queries as it loads them and runs first: no delta pass. With `bwd_swap_tail` a head's last resident block
that holds at most 16 valid rows runs swapped, the streamed rows as the MMA's 64 and 16 columns for its few
(`swap_rows`). Deterministic like Triton's: no atomics, each block's sums in one order.

Only `launch.backward` plans and runs them (split path, from the config table's `gluon_bwd_from_n` tokens on; a kernel
whose config, `gluon_dkdv` or `gluon_dq`, is None is left to Triton's), for the calls they can take (`takes`): no key
padding mask, equal head counts, N_Q = N_KV, interleaved RoPE with one table (or one per head) or none, bf16/fp16, D =
64, TMA-readable q, k, v, dO and dense channels in o, dq, dk, dv. Gluon has no interpreter: the GPU parity tests and the
offline sm_90 compile check cover them (tests/backends/triton_fa_rope/test_gluon_bwd.py, test_sm90.py). Measured on an
H200: benchmarks/README.md.
"""

from __future__ import annotations

import torch

from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope.configs import ArchConfigs, KernelConfig
from attnhub.backends.triton_fa_rope.gluon_fwd import HEAD_D, _maker, _tma_strides
from attnhub.backends.triton_fa_rope.gluon_bwd_kernels import gluon_dkdv_kernel, gluon_dq_kernel
from attnhub.rope import table_strides

_TAKES: dict = {}  # call signature -> whether the kernels take it (`runtime.remember`)
_PLANS: dict = {}  # call signature -> (dK/dV launch, dQ launch) or None


def takes(q, k, v, do, rope, *grads) -> bool:
    """Whether the kernels can take this backward: q, k (rotated), v, do: [B, H, N, D] (bf16 or fp16, D = 64, one
    shape, TMA-readable strides, 16-byte aligned bases); rope None or interleaved with one table or one per head;
    grads: where gradients go (dense channels)."""
    sig = (q.shape, k.shape, v.shape, do.shape, q.stride(), k.stride(), v.stride(), do.stride(), q.dtype, k.dtype,
           v.dtype, do.dtype, None if rope is None else (rope.layout, rope.cos.dim()),
           tuple(g.stride(-1) for g in grads))
    return runtime.remember(_TAKES, sig, lambda: _takes(q, k, v, do, rope, grads)) and runtime.aligned(q, k, v, do)


def _takes(q, k, v, do, rope, grads) -> bool:
    if q.dtype not in (torch.bfloat16, torch.float16) or not k.dtype == v.dtype == do.dtype == q.dtype:
        return False
    if q.shape[-1] != HEAD_D or not q.shape == k.shape == v.shape == do.shape:
        return False
    if rope is not None and (rope.layout != "interleaved" or rope.cos.dim() == 4):
        return False
    return all(g.stride(-1) == 1 for g in grads) and all(_tma_strides(t) for t in (q, k, v, do))


def tail_rows(N: int, block_m: int) -> int:
    """Rows of the last query block as the kernel runs it (0: a whole block): the remainder N % block_m rounded up
    to 16 or 32 when that is narrower than the block (wgmma's N in steps that keep the layouts simple)."""
    rem = N % block_m
    for rows in (16, 32):
        if 0 < rem <= rows < block_m:
            return rows
    return 0


def swap_rows(N: int, resident: int, streamed: int, config: ArchConfigs) -> int:
    """Valid rows a head's last resident block (`resident` rows) runs swapped with (`bwd_swap_tail`; 0: as written):
    16 where it holds at most 16 (577 = 9 * 64 + 1, 1029 = 16 * 64 + 5), with one warpgroup's 64-row blocks on both
    sides (the streamed ones become the MMA's 64 rows), in heads of several blocks: Triton 3.6 fails to lower the
    swapped kernels at N = 1 (an int argument of 1 compiles as a constant), and one block's heads take the fused
    backward anyway."""
    swap = config.bwd_swap_tail and resident == streamed == 64 and N > resident
    return 16 if swap and 0 < N % resident <= 16 else 0


def _check(name: str, cfg: KernelConfig, resident: int, streamed: int) -> None:
    if resident != 16 * cfg.num_warps or cfg.num_stages < 2 or streamed not in (64, 128):
        raise ValueError(f"triton_fa_rope: {name} {cfg} needs its resident rows = 16 * num_warps (a warpgroup's 64 "
                         "rows per 4 warps), streamed rows 64 or 128 and num_stages >= 2")


class _Launch:
    """One kernel's launch as a call signature fixes it: descriptor makers of q, k, v, do (blocks of q_rows and
    kv_rows), the grid, the int arguments, warps and constexprs (with the register cap)."""

    __slots__ = ("kernel", "makers", "grid", "ints", "num_warps", "constexprs")

    def __init__(self, kernel, tensors, q_rows, kv_rows, grid, ints, cfg: KernelConfig, **constexprs):
        self.kernel = kernel
        self.makers = tuple(_maker(t, rows) for t, rows in zip(tensors, (q_rows, kv_rows, kv_rows, q_rows)))
        self.grid, self.ints, self.num_warps = grid, ints, cfg.num_warps
        self.constexprs = {**cfg.options(), **constexprs}


def _plan(q, k, v, do, o, dq, dk, dv, rope, cos, config: ArchConfigs) -> tuple[_Launch | None, _Launch | None]:
    """The dK/dV and dQ launches of this call signature (None: that kernel's config is None), for a call the
    kernels take; cos: the table as the kernels read it."""
    B, H, N, D = q.shape
    stab_h, stab_n, P = (0, 0, 0) if rope is None else (*table_strides(cos)[1:], rope.prefix_tokens)
    tensors = (q, k, v, do)
    rope_on = rope is not None
    dkdv = dq_ = None
    if config.gluon_dkdv is not None:
        cfg = config.gluon_dkdv
        _check("gluon_dkdv", cfg, cfg.block_n, cfg.block_m)
        blocks = -(-N // cfg.block_n)
        dkdv = _Launch(gluon_dkdv_kernel, tensors, cfg.block_m, cfg.block_n, (blocks * B * H,),
                       (*dk.stride()[:3], *dv.stride()[:3], stab_h, stab_n, H, N, P, blocks), cfg, ROPE=rope_on,
                       STAGES=cfg.num_stages, TAIL_M=tail_rows(N, cfg.block_m) if config.narrow_tail else 0,
                       SWAP_K=swap_rows(N, cfg.block_n, cfg.block_m, config))
    if config.gluon_dq is not None:
        cfg = config.gluon_dq
        _check("gluon_dq", cfg, cfg.block_m, cfg.block_n)
        blocks = -(-N // cfg.block_m)
        dq_ = _Launch(gluon_dq_kernel, tensors, cfg.block_m, cfg.block_n, (blocks * B * H,),
                      (*o.stride()[:3], *dq.stride()[:3], stab_h, stab_n, H, N, P, blocks), cfg, ROPE=rope_on,
                      STAGES=cfg.num_stages, TAIL_N=tail_rows(N, cfg.block_n) if config.narrow_tail else 0,
                      DELTA=config.delta_in_dq, SWAP_Q=swap_rows(N, cfg.block_m, cfg.block_n, config))
    return dkdv, dq_


def plan(q, k, v, do, o, dq, dk, dv, rope, cos, config: ArchConfigs) -> tuple[_Launch | None, _Launch | None]:
    """The launches of the dK/dV (config.gluon_dkdv) and dQ (config.gluon_dq) kernels for this backward, each None
    where it does not run (its config is None, or the kernels do not take the call: `takes`): the caller runs
    Triton's kernel instead. q, k (rotated), v, do, o: [B, H, N, D]; dq, dk, dv: where the gradients go; cos: the
    table as the Triton kernels read it. One cached decision per call signature."""
    sig = (q.shape, k.shape, v.shape, do.shape, q.stride(), k.stride(), v.stride(), do.stride(), o.stride(),
           dq.stride(), dk.stride(), dv.stride(), q.dtype, k.dtype, v.dtype, do.dtype, q.device,
           None if rope is None else (rope.layout, cos.shape, cos.stride(), rope.prefix_tokens),
           config.gluon_dkdv, config.gluon_dq, config.narrow_tail, config.delta_in_dq, config.bwd_swap_tail)
    launches = runtime.remember(_PLANS, sig, lambda: _plan(q, k, v, do, o, dq, dk, dv, rope, cos, config)
                                if _takes(q, k, v, do, rope, (o, dq, dk, dv)) else None)
    return launches if launches is not None and runtime.aligned(q, k, v, do) else (None, None)


def run(launches, which: int, q, k, v, do, o, lse, delta, dq, dk, dv, cos, sin, qk_scale: float, scale: float,
        launch) -> None:
    """Launch launches[which] of `plan` (0: dK/dV into dk, dv; 1: dQ into dq, and delta when it computes it: it
    then runs first) from the rotated q, k, v, do, o, lse and delta [B*H, N] fp32 (base 2). cos, sin: the tables
    as the Triton kernels read them; qk_scale: scale * log2(e)."""
    spec = launches[which]
    ptrs = (lse, delta, dk, dv) if which == 0 else (o, lse, delta, dq)
    args = (*(make(t) for make, t in zip(spec.makers, (q, k, v, do))), *ptrs, cos, sin, *spec.ints, qk_scale, scale)
    if launch is runtime.launch:  # the plan knows every argument's specialization but these alignments
        aligned = tuple(t.data_ptr() % 16 == 0 for t in (cos, sin, *ptrs))
        runtime.launch_keyed((launches, which, aligned, qk_scale, scale), spec.kernel, spec.grid, args,
                             spec.num_warps, 1, **spec.constexprs)
    else:
        launch(spec.kernel, spec.grid, args, spec.num_warps, 1, **spec.constexprs)
