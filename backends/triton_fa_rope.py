"""FlashAttention-style Triton forward and backward with 2D axial RoPE fused into the kernels.

Read top-down: jit helpers (loads, rotation, stores), the forward kernel and the rotation pass, the backward
helpers and kernels (split: preprocess, dk/dv, dq; fused), the launcher (configs, path choice, grids, strides, the
compiled kernels it keeps per launch so a repeated call skips Triton's per-launch argument specialization),
the `autograd.Function`, the torch.compile custom operators, the entry `attention`.

How RoPE is fused. RoPE rotates channel pairs `(a_j, b_j)` of q and k (`j < D/2`; pairs `(2j, 2j+1)` for the
interleaved layout, `(j, j + D/2)` for the half layout). The kernels load a q or k tile as two pair tiles
`[BLOCK, D/2]` (interleaved: one contiguous row load split in registers; half: two contiguous half-row loads),
rotate them in fp32 with the `[N_grid, D/2]` cos/sin table, and join them back into one `[BLOCK, D]` tile in
the order `(a_0, b_0, a_1, b_1, ...)`. The same channel permutation on q and k leaves `q . k` unchanged, so
one `tl.dot` over D computes the scores.

Training: the forward also writes the rotated q and k it computed (in that joined order), so the backward
kernels are plain FlashAttention-2 loops without any rotation; only dq and dk are rotated back (by R^T) and
scattered to the caller's layout when they are stored. Inference writes nothing extra.

A table that requires grad (learnable frequencies, RoPE-Mixed) gets its gradient from `_table_grad`, in PyTorch
after the backward kernels: from the unrotated q, k (then saved as well) and their gradients, summed over the batch.

Forward variants, per GPU in the config table (`_FWD_VARIANTS`, measured by benchmarks/fwd_paths.py): rotating
K (inference) or q and K (training) in a separate pass (`_rotate_kernel`) from a sequence length on, so that the
attention kernel's K tiles feed the tensor cores without a rotation per query block; and a narrow last K tile.

Two backward paths, both deterministic (no atomics: bitwise-equal gradients run to run):
- split, three launches: `_bwd_preprocess` (delta = rowsum(o * do), [B*H, N_Q] fp32), `_bwd_dkdv_kernel` (one
  program per BLOCK_N keys, looping over all queries) and `_bwd_dq_kernel` (one program per BLOCK_M queries,
  looping over all keys, recomputing the scores);
- fused, one launch: `_bwd_fused_kernel`, one program per (b, h). It computes delta, then
  takes BLOCK_N keys at a time against all queries, accumulating dk, dv in registers and each query block's dq
  in an fp32 scratch [B*H, N_Q, D] (read-modify-write, in a fixed order), then rotates dq back and stores it.
  One pass over the scores instead of two, one launch and one compilation instead of three; but only B*H
  programs, each walking every (key block, query block) pair in turn, so on an H100 it is slower than split at
  every swept ViT shape (see the configs below) and wins only where the host's launch time is the limit.
`_backward` takes the fused path while max(N_Q, N_KV) <= the config's "bwd_fused_max_n" (0 everywhere today:
never automatically). The environment variable ATTNHUB_TRITON_BWD, read once at import, forces a path: "auto"
(default), "fused" or "split"; any other value raises ValueError. Tests and benchmarks assign `_BWD_PATH`.

First call: the first training call of a shape compiles all its kernels, and builds their launchers, in parallel
threads before launching (`_compile_ahead`); ATTNHUB_TRITON_COMPILE_AHEAD=0 (read at import) turns that off.

Numerics: fp32 accumulation, online softmax in base 2 with the log-sum-exp kept in fp32 for the backward.
float32 inputs use IEEE fp32 dots (not TF32), so every backend computes the same function to fp32 round-off.
Under `TRITON_INTERPRET=1` (CPU) bfloat16 dot operands are upcast to fp32 (triton-lang/triton#11584).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from attnhub.rope import CosSinTable, split_pairs

log = logging.getLogger(__name__)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _load_rows(base, offs_n, mask_n, stride_n, stride_d, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """x[offs_n, :D] as [BLOCK, BLOCK_D] (zero padded)."""
    mask = mask_n[:, None]
    if HEAD_D != BLOCK_D:
        mask = mask & (offs_d[None, :] < HEAD_D)
    return tl.load(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, x, offs_n, mask_n, stride_n, stride_d, offs_d, HEAD_D: tl.constexpr,
                BLOCK_D: tl.constexpr):
    mask = mask_n[:, None]
    if HEAD_D != BLOCK_D:
        mask = mask & (offs_d[None, :] < HEAD_D)
    tl.store(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, x.to(base.dtype.element_ty),
             mask=mask)


@triton.jit
def _pair_mask(mask_n, offs_j, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr):
    mask = mask_n[:, None]
    if HEAD_D2 != BLOCK_D2:
        mask = mask & (offs_j[None, :] < HEAD_D2)
    return mask


@triton.jit
def _table(cos_base, sin_base, offs_n, mask_n, stride_tn, P, offs_j, HEAD_D2: tl.constexpr,
           BLOCK_D2: tl.constexpr):
    """cos, sin [BLOCK, BLOCK_D2] fp32 for sequence positions offs_n; identity (1, 0) on prefix tokens."""
    t = offs_n - P
    mask = _pair_mask(mask_n & (t >= 0), offs_j, HEAD_D2, BLOCK_D2)
    off = t[:, None] * stride_tn + offs_j[None, :]
    c = tl.load(cos_base + off, mask=mask, other=1.0).to(tl.float32)
    s = tl.load(sin_base + off, mask=mask, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _load_qk(base, offs_n, mask_n, stride_n, stride_d, cos_base, sin_base, stride_tn, P, offs_j, offs_d,
             HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
             PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
             DOT: tl.constexpr):
    """A q or k tile [BLOCK, BLOCK_D] in the dot dtype; with ROPE rotated, in joined pair order (a0, b0, a1, ..)."""
    if not ROPE:
        return _load_rows(base, offs_n, mask_n, stride_n, stride_d, offs_d, HEAD_D, BLOCK_D).to(DOT)
    if SPLIT:  # interleaved pairs, D a power of two: one vectorized row load, pairs separated in registers
        x = tl.load(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask_n[:, None],
                    other=0.0)
        xa, xb = tl.split(tl.reshape(x, [offs_n.shape[0], BLOCK_D2, 2]))
    else:
        mask = _pair_mask(mask_n, offs_j, HEAD_D2, BLOCK_D2)
        ptr = base + offs_n[:, None] * stride_n + (offs_j * PAIR_STEP)[None, :] * stride_d
        xa = tl.load(ptr, mask=mask, other=0.0)
        xb = tl.load(ptr + PAIR_OFF * stride_d, mask=mask, other=0.0)
    c, s = _table(cos_base, sin_base, offs_n, mask_n, stride_tn, P, offs_j, HEAD_D2, BLOCK_D2)
    xa = xa.to(tl.float32)
    xb = xb.to(tl.float32)
    ra = (xa * c - xb * s).to(DOT)
    rb = (xb * c + xa * s).to(DOT)
    return tl.reshape(tl.join(ra, rb), [offs_n.shape[0], BLOCK_D])


@triton.jit
def _store_grad_qk(base, g, offs_n, mask_n, stride_n, stride_d, cos_base, sin_base, stride_tn, P, offs_j, offs_d,
                   HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
                   PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr):
    """Store dq or dk [BLOCK, BLOCK_D] fp32. With ROPE g is w.r.t. the rotated, joined-order tile: rotate it back
    by R^T, (a, b) -> (a cos + b sin, b cos - a sin), and scatter the pairs to the caller's layout."""
    if not ROPE:
        _store_rows(base, g, offs_n, mask_n, stride_n, stride_d, offs_d, HEAD_D, BLOCK_D)
    else:
        ga, gb = tl.split(tl.reshape(g, [offs_n.shape[0], BLOCK_D2, 2]))
        c, s = _table(cos_base, sin_base, offs_n, mask_n, stride_tn, P, offs_j, HEAD_D2, BLOCK_D2)
        ga, gb = ga * c + gb * s, gb * c - ga * s
        if SPLIT:
            x = tl.reshape(tl.join(ga, gb), [offs_n.shape[0], BLOCK_D])
            tl.store(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, x.to(base.dtype.element_ty),
                     mask=mask_n[:, None])
        else:
            mask = _pair_mask(mask_n, offs_j, HEAD_D2, BLOCK_D2)
            ptr = base + offs_n[:, None] * stride_n + (offs_j * PAIR_STEP)[None, :] * stride_d
            tl.store(ptr, ga.to(base.dtype.element_ty), mask=mask)
            tl.store(ptr + PAIR_OFF * stride_d, gb.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _program_rows(N, H, BLOCK: tl.constexpr):
    """This program's (b, h) pair and rows when launch-grid axis 0 enumerates (b, h, block of BLOCK rows of N):
    -> bh, b, h (int64 for the base offsets), offs [BLOCK], mask [BLOCK]."""
    n_blocks = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    bh = pid // n_blocks
    offs = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), offs, offs < N


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=PRECISION)


# ---------------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tile(q, m_i, l_i, acc, k_base, v_base, start_n, N_KV, skn, skd, svn, svd, cos_base, sin_base,
              stab_n, P, qk_scale, offs_j, offs_d, KR_base, n_m, pid_m,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
              PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
              MASK: tl.constexpr, SAVE_ROT: tl.constexpr):
    """One K/V tile of the online softmax. MASK: the tile reaches past N_KV (only the last one does)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK:
        mask_n = offs_n < N_KV
    else:
        mask_n = tl.full([BLOCK_N], 1, tl.int1)
    k = _load_qk(k_base, offs_n, mask_n, skn, skd, cos_base, sin_base, stab_n, P, offs_j, offs_d,
                 HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE, DOT)
    if SAVE_ROT:  # K tile t is saved by query block t mod n_m: the extra writes spread evenly over programs
        if (start_n // BLOCK_N) % n_m == pid_m:
            _store_rows(KR_base, k, offs_n, mask_n, HEAD_D, 1, offs_d, HEAD_D, BLOCK_D)
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION) * qk_scale
    if MASK:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_base, offs_n, mask_n, svn, svd, offs_d, HEAD_D, BLOCK_D)
    acc = _dot(p.to(DOT), v.to(DOT), acc * alpha[:, None], PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["H", "P"])  # head count and prefix length: no recompiles across models
def _fwd_kernel(
    Q, K, V, O, LSE, COS, SIN, QR, KR,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, stab_h, stab_n,
    H, N_Q, N_KV, P, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    SAVE_ROT: tl.constexpr, ROPE_K: tl.constexpr, TAIL_N: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (b, h). O: [B, H, N_Q, D]; LSE: [B*H, N_Q] fp32, base 2.

    SAVE_ROT (training with RoPE): also write the rotated q and k tiles to QR, KR ([B*H, N, D], joined order).
    ROPE_K: rotate the K tiles (only with ROPE; False when K arrives pre-rotated by `_rotate_kernel`).
    TAIL_N: the width of the last, masked K tile (BLOCK_N, or with "narrow_tail" N_KV % BLOCK_N rounded up to a
    power of two >= 16: at ViT lengths, 197 = 3 * 64 + 5, a full-width tile computes 59 padded keys for 5 real ones).
    """
    n_m = tl.cdiv(N_Q, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    bh, b, h, offs_m, mask_m = _program_rows(N_Q, H, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_D2)
    offs_d = tl.arange(0, BLOCK_D)
    cos_base = COS + h * stab_h
    sin_base = SIN + h * stab_h

    q = _load_qk(Q + b * sqb + h * sqh, offs_m, mask_m, sqn, sqd, cos_base, sin_base, stab_n, P, offs_j, offs_d,
                 HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE, DOT)
    rot_base = bh.to(tl.int64) * N_Q * HEAD_D
    if SAVE_ROT:
        _store_rows(QR + rot_base, q, offs_m, mask_m, HEAD_D, 1, offs_d, HEAD_D, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, start_n, N_KV, skn, skd, svn, svd,
                                  cos_base, sin_base, stab_n, P, qk_scale, offs_j, offs_d, KR + rot_base, n_m, pid_m,
                                  HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE_K,
                                  BLOCK_M, BLOCK_N, DOT, PRECISION, False, SAVE_ROT)
    if n_full < N_KV:
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, n_full, N_KV, skn, skd, svn, svd,
                                  cos_base, sin_base, stab_n, P, qk_scale, offs_j, offs_d, KR + rot_base, n_m, pid_m,
                                  HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE_K,
                                  BLOCK_M, TAIL_N, DOT, PRECISION, True, SAVE_ROT)

    acc = acc / l_i[:, None]
    _store_rows(O + b * sob + h * soh, acc, offs_m, mask_m, son, sod, offs_d, HEAD_D, BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.jit(do_not_specialize=["H", "P"])
def _rotate_kernel(
    X, XR, COS, SIN, sxb, sxh, sxn, sxd, stab_h, stab_n, H, N, P,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One program: BLOCK_M rows of one (b, h) of X [B, H, N, D] (any strides) rotated into XR [B*H, N, D]
    (contiguous, joined pair order, the dot dtype)."""
    bh, b, h, offs_m, mask_m = _program_rows(N, H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_qk(X + b * sxb + h * sxh, offs_m, mask_m, sxn, sxd, COS + h * stab_h, SIN + h * stab_h, stab_n, P,
                 tl.arange(0, BLOCK_D2), offs_d, HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, True,
                 DOT)
    _store_rows(XR + bh.to(tl.int64) * N * HEAD_D, x, offs_m, mask_m, HEAD_D, 1, offs_d, HEAD_D, BLOCK_D)


# --------------------------------------------------------------------------------------------------- backward
# q and k arrive already rotated (QR, KR from the forward; or the inputs themselves without RoPE), so these are
# plain FlashAttention-2 loops; dq and dk are rotated back only when they are stored. Two paths, both without
# atomics (bitwise repeatable): split (preprocess, dk/dv, dq: three launches, the dq kernel recomputes the scores)
# and fused (one program per (b, h) does everything, dq accumulated in an fp32 scratch; short sequences).
@triton.jit
def _bwd_delta(o_base, do_base, delta_base, offs_m, mask_m, son, sod, sdon, sdod, offs_d,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_base[offs_m] = sum_d O * dO (fp32): the softmax-gradient row term of one query block."""
    o = _load_rows(o_base, offs_m, mask_m, son, sod, offs_d, HEAD_D, BLOCK_D).to(tl.float32)
    do = _load_rows(do_base, offs_m, mask_m, sdon, sdod, offs_d, HEAD_D, BLOCK_D).to(tl.float32)
    tl.store(delta_base + offs_m, tl.sum(o * do, 1), mask=mask_m)


@triton.jit
def _bwd_q_block(q_base, do_base, lse_base, delta_base, offs_m, mask_m, sqn, sqd, sdon, sdod, offs_d,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    """q, dO [BLOCK_M, BLOCK_D] in the dot dtype, lse and delta [BLOCK_M] fp32 of one query block. Rows past N_Q:
    q = dO = 0 and lse = +inf, which makes their probabilities exactly 0."""
    q = _load_rows(q_base, offs_m, mask_m, sqn, sqd, offs_d, HEAD_D, BLOCK_D).to(DOT)
    do = _load_rows(do_base, offs_m, mask_m, sdon, sdod, offs_d, HEAD_D, BLOCK_D).to(DOT)
    lse = tl.load(lse_base + offs_m, mask=mask_m, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
    return q, do, lse, delta


@triton.jit
def _bwd_kv_tile(k, v, q, do, lse, delta, dk, dv, mask_n, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                 MASK_N: tl.constexpr):
    """BLOCK_N keys k, v [BLOCK_N, BLOCK_D] against one query block (from `_bwd_q_block`): dk, dv [BLOCK_N,
    BLOCK_D] fp32 accumulated; -> dk, dv, dS^T [BLOCK_N, BLOCK_M] in the dot dtype (unscaled: dq = scale dS k).
    MASK_N: P^T = 0 on rows of keys past N_KV, where dS feeds dq. (Their k rows are zero-padded, so dS k adds 0
    for finite values anyway; the mask keeps an infinite P from making it NaN, as in the split dq kernel.)"""
    st = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISION)
    pt = tl.math.exp2(st * qk_scale - lse[None, :])  # P^T [BLOCK_N, BLOCK_M]
    if MASK_N:
        pt = tl.where(mask_n[:, None], pt, 0.0)
    dv = _dot(pt.to(DOT), do, dv, PRECISION)
    dpt = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), PRECISION)
    dst = (pt * (dpt - delta[None, :])).to(DOT)
    dk = _dot(dst, q, dk, PRECISION)
    return dk, dv, dst


@triton.jit
def _bwd_store_dkdv(dk_base, dv_base, dk, dv, scale, offs_n, mask_n, sdkn, sdkd, sdvn, sdvd, cos_base, sin_base,
                    stab_n, P, offs_j, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr,
                    BLOCK_D2: tl.constexpr, PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr,
                    ROPE: tl.constexpr):
    """Store dk (times scale, rotated back) and dv [BLOCK_N, BLOCK_D] fp32 of BLOCK_N keys."""
    _store_grad_qk(dk_base, dk * scale, offs_n, mask_n, sdkn, sdkd, cos_base, sin_base, stab_n, P, offs_j, offs_d,
                   HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE)
    _store_rows(dv_base, dv, offs_n, mask_n, sdvn, sdvd, offs_d, HEAD_D, BLOCK_D)


@triton.jit(do_not_specialize=["H"])  # no recompile per head count
def _bwd_preprocess(O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, H, N_Q,
                    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Split path. One program: DELTA [B*H, N_Q] fp32 of BLOCK_M query rows of one (b, h)."""
    bh, b, h, offs_m, mask_m = _program_rows(N_Q, H, BLOCK_M)
    _bwd_delta(O + b * sob + h * soh, DO + b * sdob + h * sdoh, DELTA + bh.to(tl.int64) * N_Q, offs_m,
               mask_m, son, sod, sdon, sdod, tl.arange(0, BLOCK_D), HEAD_D, BLOCK_D)


@triton.jit(do_not_specialize=["H", "P"])  # head count and prefix length: no recompiles across models
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, COS, SIN,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, stab_h, stab_n,
    H, N_Q, N_KV, P, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Split path. One program: dk, dv for BLOCK_N keys of one (b, h), looping over all queries."""
    bh, b, h, offs_n, mask_n = _program_rows(N_KV, H, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_D2)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_rows(K + b * skb + h * skh, offs_n, mask_n, skn, skd, offs_d, HEAD_D, BLOCK_D).to(DOT)
    v = _load_rows(V + b * svb + h * svh, offs_n, mask_n, svn, svd, offs_d, HEAD_D, BLOCK_D).to(DOT)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    row_base = bh.to(tl.int64) * N_Q

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _bwd_q_block(q_base, do_base, LSE + row_base, DELTA + row_base, offs_m, offs_m < N_Q,
                                         sqn, sqd, sdon, sdod, offs_d, HEAD_D, BLOCK_D, DOT)
        dk, dv, _ = _bwd_kv_tile(k, v, q, do, lse, delta, dk, dv, mask_n, qk_scale,
                                 BLOCK_M, BLOCK_N, DOT, PRECISION, False)  # rows past N_KV are not stored

    _bwd_store_dkdv(DK + b * sdkb + h * sdkh, DV + b * sdvb + h * sdvh, dk, dv, scale, offs_n, mask_n,
                    sdkn, sdkd, sdvn, sdvd, COS + h * stab_h, SIN + h * stab_h, stab_n, P, offs_j, offs_d,
                    HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE)


@triton.jit(do_not_specialize=["H", "P"])  # head count and prefix length: no recompiles across models
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, COS, SIN,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd, stab_h, stab_n,
    H, N_Q, N_KV, P, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Split path. One program: dq for BLOCK_M queries of one (b, h), looping over all keys."""
    bh, b, h, offs_m, mask_m = _program_rows(N_Q, H, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_D2)
    offs_d = tl.arange(0, BLOCK_D)

    row_base = bh.to(tl.int64) * N_Q
    q, do, lse, delta = _bwd_q_block(Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, LSE + row_base,
                                     DELTA + row_base, offs_m, mask_m, sqn, sqd, sdon, sdod, offs_d,
                                     HEAD_D, BLOCK_D, DOT)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_KV, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_KV
        k = _load_rows(k_base, offs_n, mask_n, skn, skd, offs_d, HEAD_D, BLOCK_D).to(DOT)
        v = _load_rows(v_base, offs_n, mask_n, svn, svd, offs_d, HEAD_D, BLOCK_D).to(DOT)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
        ds = (p * (dp - delta[:, None])).to(DOT)
        dq = _dot(ds, k, dq, PRECISION)

    _store_grad_qk(DQ + b * sdqb + h * sdqh, dq * scale, offs_m, mask_m, sdqn, sdqd, COS + h * stab_h,
                   SIN + h * stab_h, stab_n, P, offs_j, offs_d, HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP,
                   PAIR_OFF, SPLIT, ROPE)


@triton.jit(do_not_specialize=["H", "P"])  # head count and prefix length: no recompiles across models
def _bwd_fused_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQACC, DQ, DK, DV, COS, SIN,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod, sob, soh, son, sod,
    sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, stab_h, stab_n,
    H, N_Q, N_KV, P, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fused path. One program: the whole backward of one (b, h), in one pass over the scores.

    Pass 0 writes DELTA [B*H, N_Q] fp32. The main loop takes BLOCK_N keys at a time and all queries: dk, dv as in
    the split dk/dv kernel, and each query block's dq contribution dS k added into the scratch DQACC [B*H, N_Q, D]
    fp32 (read-modify-write; the first key block only writes). The last pass rotates DQACC back into DQ. The
    program re-reads what its own threads wrote with other thread-element mappings, hence the barriers.
    """
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_D2)
    offs_d = tl.arange(0, BLOCK_D)
    row_base = bh.to(tl.int64) * N_Q
    lse_base = LSE + row_base
    delta_base = DELTA + row_base
    acc_base = DQACC + row_base * HEAD_D
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    cos_base = COS + h * stab_h
    sin_base = SIN + h * stab_h

    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        _bwd_delta(O + b * sob + h * soh, do_base, delta_base, offs_m, offs_m < N_Q, son, sod, sdon, sdod, offs_d,
                   HEAD_D, BLOCK_D)
    tl.debug_barrier()

    for start_n in range(0, N_KV, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_KV
        k = _load_rows(k_base, offs_n, mask_n, skn, skd, offs_d, HEAD_D, BLOCK_D).to(DOT)
        v = _load_rows(v_base, offs_n, mask_n, svn, svd, offs_d, HEAD_D, BLOCK_D).to(DOT)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, N_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < N_Q
            q, do, lse, delta = _bwd_q_block(q_base, do_base, lse_base, delta_base, offs_m, mask_m,
                                             sqn, sqd, sdon, sdod, offs_d, HEAD_D, BLOCK_D, DOT)
            dk, dv, dst = _bwd_kv_tile(k, v, q, do, lse, delta, dk, dv, mask_n, qk_scale,
                                       BLOCK_M, BLOCK_N, DOT, PRECISION, True)
            # dq_i += dS_ij k_j; the first key block finds nothing to add (the load is masked off, DQACC unset)
            dq = _load_rows(acc_base, offs_m, mask_m & (start_n > 0), HEAD_D, 1, offs_d, HEAD_D, BLOCK_D)
            dq = _dot(tl.trans(dst), k, dq, PRECISION)
            _store_rows(acc_base, dq, offs_m, mask_m, HEAD_D, 1, offs_d, HEAD_D, BLOCK_D)
        tl.debug_barrier()  # this key block's DQACC writes land before the next one reads them
        _bwd_store_dkdv(DK + b * sdkb + h * sdkh, DV + b * sdvb + h * sdvh, dk, dv, scale, offs_n, mask_n,
                        sdkn, sdkd, sdvn, sdvd, cos_base, sin_base, stab_n, P, offs_j, offs_d,
                        HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE)

    tl.debug_barrier()
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_Q
        dq = _load_rows(acc_base, offs_m, mask_m, HEAD_D, 1, offs_d, HEAD_D, BLOCK_D)
        _store_grad_qk(DQ + b * sdqb + h * sdqh, dq * scale, offs_m, mask_m, sdqn, sdqd, cos_base, sin_base,
                       stab_n, P, offs_j, offs_d, HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT,
                       ROPE)


# --------------------------------------------------------------------------------------------------- launcher
# Tuned per (compute capability major, head-dim bucket): (BLOCK_M, BLOCK_N, num_warps, num_stages) for the
# forward (inference; "fwd_train" when it also writes the rotated q, k), the split backward's dk/dv and dq
# kernels and the fused backward kernel, and "bwd_fused_max_n", the
# longest sequence (max of N_Q, N_KV) for which `_backward` takes the fused path. Fixed configs, no run-time
# autotune: the first call on a new shape costs one compilation per kernel. Measured with
# benchmarks/tune_triton.py and benchmarks/bwd_variants.py (see benchmarks/results/).
# A table may also set the `_FWD_VARIANTS` keys (below); those it does not set take their defaults.
_CONFIGS = {
    # Hopper (H100/H200). D <= 64: swept on H100 at N = 197, 577 and 1029 (benchmarks/results/dev_h100_tune3.json;
    # forward: dev_h100_fwd_variants.json, the training forward with its extra q/k writes prefers BLOCK_N = 32;
    # fused backward: dev_h100_bwd_variants.json). Larger D: not yet swept.
    # bwd_fused_max_n = 0: the fused backward is slower on the GPU than the split one at every swept shape (ViT-S
    # 0.388 vs 0.335 ms at its best config; ViT-B/16@384 1.17 vs 0.78 ms): B*H programs are too few and each
    # walks every (key block, query block) pair serially. It only wins where the host is the limit (one launch
    # instead of three), so it stays opt-in: ATTNHUB_TRITON_BWD=fused.
    # Forward variants (benchmarks/results/dev_h100_fwd_paths.json, bf16, N = 197, 577, 1029): the narrow tail wins
    # at every shape (3-9%); rotating K or q and K first wins from N = 577 on (ViT-B/16@384 training forward
    # 0.475 -> 0.299 ms, @512 0.675 -> 0.378 ms, inference 0.341 -> 0.299 and 0.495 -> 0.400 ms) and loses at
    # N = 197 (ViT-S inference 0.141 vs 0.147 ms); at N = 197 the in-kernel training forward prefers BLOCK_M = 256
    # (one query block per (b, h): each K tile rotated once; 0.172 vs 0.184 ms).
    (9, 64): {"fwd": (128, 64, 4, 3), "fwd_train": (256, 64, 8, 3), "fwd_train_prerotated": (128, 64, 8, 3),
              "prerotate_from_n": (384, 384), "narrow_tail": True,
              "dkdv": (32, 128, 4, 2), "dq": (128, 64, 8, 3), "bwd_fused": (128, 128, 8, 1), "bwd_fused_max_n": 0},
    (9, 128): {"fwd": (128, 64, 8, 2), "fwd_train": (128, 64, 8, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 64, 4, 2),
               "bwd_fused": (64, 64, 8, 2), "bwd_fused_max_n": 0},
    (9, 256): {"fwd": (64, 32, 8, 2), "fwd_train": (64, 32, 8, 2), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1),
               "bwd_fused": (32, 32, 8, 1), "bwd_fused_max_n": 0},
}
_DEFAULT = {  # other GPUs: not swept; the fused backward only when forced
    64: {"fwd": (64, 64, 4, 2), "fwd_train": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2), "dq": (64, 64, 4, 2),
         "bwd_fused": (64, 64, 4, 2), "bwd_fused_max_n": 0},
    128: {"fwd": (64, 64, 4, 2), "fwd_train": (64, 64, 4, 2), "dkdv": (64, 32, 4, 2), "dq": (64, 32, 4, 2),
          "bwd_fused": (64, 32, 4, 2), "bwd_fused_max_n": 0},
    256: {"fwd": (64, 32, 8, 1), "fwd_train": (64, 32, 8, 1), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 8, 1),
          "bwd_fused": (32, 32, 8, 1), "bwd_fused_max_n": 0},
}
# Forward variants; a config table sets those it measured, the others take these defaults (off):
# - "prerotate_from_n" (inference, training): from this sequence length on (None: never), rotate K (inference) or
#   q and K (training, where the rotated q and K are saved for the backward anyway) in one `_rotate_kernel` pass,
#   so the attention kernel's K loads feed the tensor cores directly instead of being rotated in registers by every
#   query block. The prerotated training forward runs with "fwd_train_prerotated" (default: "fwd_train").
# - "narrow_tail": the last, partial K tile only as wide as the remainder needs (`_tail`).
_FWD_VARIANTS = {"prerotate_from_n": (None, None), "narrow_tail": False}
_INTERPRETER_CONFIG = {**_FWD_VARIANTS, "fwd": (32, 32, 1, 1), "fwd_train": (32, 32, 1, 1),
                       "fwd_train_prerotated": (32, 32, 1, 1), "dkdv": (32, 32, 1, 1), "dq": (32, 32, 1, 1),
                       "bwd_fused": (32, 32, 1, 1), "bwd_fused_max_n": 0}
_ROT_M = 64  # rows per program of `_rotate_kernel` (a pure load-rotate-store pass)
_ROT_META = ("HEAD_D", "BLOCK_D", "HEAD_D2", "BLOCK_D2", "PAIR_STEP", "PAIR_OFF", "SPLIT", "DOT")
_MAX_PROGRAMS = 2**31 - 1  # launch-grid axis 0 limit; every kernel flattens (b, h, block) onto axis 0
_BWD_PATHS = ("auto", "fused", "split")


def _bwd_path(value: str | None) -> str:
    """The backward path forced by ATTNHUB_TRITON_BWD (unset or empty: "auto", by sequence length)."""
    value = value or "auto"
    if value not in _BWD_PATHS:
        raise ValueError(f"ATTNHUB_TRITON_BWD={value!r}: expected one of {', '.join(_BWD_PATHS)}")
    return value


# Read once, at import; tests and benchmarks switch paths by assigning this module variable.
_BWD_PATH = _bwd_path(os.environ.get("ATTNHUB_TRITON_BWD"))


def _configs(q: torch.Tensor, block_d: int) -> dict:
    if _INTERPRET or q.device.type != "cuda":
        return _INTERPRETER_CONFIG
    return _device_configs(q.device.index, block_d)


@functools.lru_cache(maxsize=None)
def _device_configs(device_index: int | None, block_d: int) -> dict:
    return _arch_configs(torch.cuda.get_device_capability(device_index)[0], block_d)


def _arch_configs(major: int, block_d: int) -> dict:
    """The config table of compute capability `major` for head dims up to `block_d`, variants defaulted."""
    bucket = min(b for b in (64, 128, 256) if b >= block_d)
    table = {**_FWD_VARIANTS, **_CONFIGS.get((major, bucket), _DEFAULT[bucket])}
    table.setdefault("fwd_train_prerotated", table["fwd_train"])
    return table


def _meta(q: torch.Tensor, rope: CosSinTable | None) -> dict:
    """Compile-time parameters shared by every kernel of one call."""
    return _meta_for(q.shape[-1], q.dtype, None if rope is None else rope.layout)


@functools.lru_cache(maxsize=None)
def _meta_for(D: int, dtype: torch.dtype, layout: str | None) -> dict:
    block_d = max(32, triton.next_power_of_2(D))  # tl.dot needs K >= 16, and pairs need BLOCK_D/2 >= 16
    dot = _dot_dtype(dtype)
    interleaved = layout == "interleaved"
    return dict(
        HEAD_D=D,
        BLOCK_D=block_d,
        HEAD_D2=D // 2,
        BLOCK_D2=block_d // 2,
        PAIR_STEP=2 if interleaved else 1,
        PAIR_OFF=1 if interleaved else D // 2,
        SPLIT=interleaved and block_d == D,
        ROPE=layout is not None,
        DOT=dot,
        PRECISION="ieee" if dot == tl.float32 else "tf32",
    )


def _dot_dtype(dtype: torch.dtype):
    """The dtype of tl.dot operands for inputs of `dtype` (fp32 in the interpreter for bf16: triton#11584)."""
    if dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16):
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _rot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved rotated q, k: the one the dots consumed, so the backward recomputes exactly the
    forward's scores."""
    return torch.float32 if _dot_dtype(dtype) == tl.float32 else dtype


def _table_args(rope: CosSinTable | None, q: torch.Tensor):
    """(cos, sin, head stride, row stride, prefix) for the kernels; a 1-element dummy without RoPE."""
    if rope is None:
        dummy = q.new_empty(1, dtype=torch.float32)
        return dummy, dummy, 0, 0, 0
    cos, sin = rope.cos.detach(), rope.sin.detach()
    if cos.dtype != torch.float32:  # e.g. a bf16 table from a model cast to bf16: the kernels read fp32 angles
        cos, sin = cos.float(), sin.float()
    head_stride = cos.stride(0) if rope.per_head else 0
    return cos, sin, head_stride, cos.stride(-2), rope.prefix_tokens


def _grid(n_rows: int, block: int, bh: int) -> int:
    """Programs on launch-grid axis 0: ceil(n_rows / block) blocks of each of bh (batch, head) pairs."""
    programs = -(-n_rows // block) * bh  # triton.cdiv costs ~3 us of host time per call (a constexpr_function)
    if programs > _MAX_PROGRAMS:
        raise ValueError(f"triton_fa_rope: {programs} programs exceed the launch-grid limit {_MAX_PROGRAMS}")
    return programs


def _triton_at_least(major: int, minor: int) -> bool:
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (major, minor)


# Compiled kernels by launch: after the first launch of a specialization, `_launch` calls Triton's compiled kernel
# directly instead of `kernel[grid](...)`, which re-derives Triton's specialization key from every argument on every
# call (on the H100 host: 88 -> 63 us per inference forward, checked bitwise; dev_h100_fwd_paths.json).
# The compiled kernel's runner takes every parameter in signature order, constexprs included, as `kernel[grid]`
# passes them to it: so in triton 3.6 and 3.8 (their source was read for this); older versions use `kernel[grid]`.
_RUNNERS: dict = {}
_RUNNERS_MAX = 4096  # distinct launches kept (shapes, strides, dtypes, configs): cleared when full
_CACHED_RUNNERS = not _INTERPRET and _triton_at_least(3, 6)


def _launch(kernel, grid: tuple, args: tuple, num_warps: int, num_stages: int, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) with the launch options: every launch of this module goes through here.

    Triton launches on the current CUDA device and its stream; args[0] (a tensor in every kernel here) says which
    device the call is on, and it is made current when it is not (tensors on cuda:1 while cuda:0 is current).
    The key of `_RUNNERS` holds everything Triton specializes on, and more: the exact value and type of every scalar,
    each tensor's dtype and 16-byte alignment, the constexprs, the launch options and the device."""
    dev = args[0].device
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            _launch(kernel, grid, args, num_warps, num_stages, **constexprs)
        return
    if not _CACHED_RUNNERS:
        kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        return
    # ints as themselves (the common case, and the cheapest), other scalars with their type (1.0 is not 1)
    key = (kernel, dev.index, num_warps, num_stages, tuple(constexprs.items()),
           tuple([a if type(a) is int else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                  else (type(a), a) for a in args]))
    hit = _RUNNERS.get(key)
    if hit is None:
        compiled = kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        params = kernel.params[len(args):]
        if not all(p.is_constexpr and p.name in constexprs for p in params):  # not this module's kernel layout
            return
        if len(_RUNNERS) >= _RUNNERS_MAX:
            _RUNNERS.clear()
        _RUNNERS[key] = (compiled, tuple(constexprs[p.name] for p in params))
        return
    compiled, tail = hit
    compiled[(*grid, 1, 1)[:3]](*args, *tail)


def _output_like(q: torch.Tensor) -> torch.Tensor:
    """o: [B, H, N, D] laid out as [B, N, H, D] in memory, so `o.transpose(1, 2).reshape(B, N, H*D)` is free."""
    B, H, N, D = q.shape
    return torch.empty(B, N, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)


def _forward(q, k, v, rope, scale, save_rotated: bool, launch=None):
    """-> o [B, H, N, D], lse [B*H, N] and, with save_rotated, rotated q and k [B, H, N, D] in joined pair order.

    With RoPE, from the config's "prerotate_from_n" (inference, training) sequence length on, K (inference) or q
    and K (training) are rotated by `_rotate_kernel` into a buffer before the attention kernel, not inside it.
    `launch` (default `_launch`) runs each kernel; `_compile_ahead` passes one that only compiles."""
    launch = launch or _launch
    B, H, N_Q, D = q.shape
    N_KV = k.shape[2]
    meta = _meta(q, rope)
    cfg = _configs(q, meta["BLOCK_D"])
    training = save_rotated and rope is not None
    from_n = cfg["prerotate_from_n"][training]
    prerotate = rope is not None and from_n is not None and N_KV >= from_n
    BLOCK_M, BLOCK_N, warps, stages = cfg[("fwd_train_prerotated" if prerotate else "fwd_train") if training
                                          else "fwd"]
    o = _output_like(q)
    lse = torch.empty(B * H, N_Q, device=q.device, dtype=torch.float32)
    cos, sin, stab_h, stab_n, P = _table_args(rope, q)
    rot_dtype = _rot_dtype(q.dtype)
    qr, kr = (torch.empty(B, H, N_Q, D, device=q.device, dtype=rot_dtype) if training else lse for _ in "qk")
    q_in, k_in, rope_k, save_rot = q, k, True, training
    if prerotate:
        if not training:
            kr = torch.empty(B, H, N_KV, D, device=q.device, dtype=rot_dtype)
        # one launch per tensor: q and k may have different strides, which Triton types and specializes apart
        for x, xr in ((q, qr), (k, kr)) if training else ((k, kr),):
            launch(_rotate_kernel, (_grid(N_KV, _ROT_M, B * H),),
                   (x, xr, cos, sin, *x.stride(), stab_h, stab_n, H, N_KV, P), 4, 1, BLOCK_M=_ROT_M,
                   **{name: meta[name] for name in _ROT_META})
        k_in, rope_k = kr, False
        if training:  # the attention kernel sees q and k already rotated: no RoPE, nothing more to save
            q_in, meta, save_rot = qr, _meta_for(D, q.dtype, None), False
    launch(_fwd_kernel, (_grid(N_Q, BLOCK_M, B * H),),
           (q_in, k_in, v, o, lse, cos, sin, qr, kr, *q_in.stride(), *k_in.stride(), *v.stride(), *o.stride(),
            stab_h, stab_n, H, N_Q, N_KV, P, scale * _LOG2E),
           warps, stages, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SAVE_ROT=save_rot, ROPE_K=rope_k and meta["ROPE"],
           TAIL_N=_tail(N_KV, BLOCK_N) if cfg["narrow_tail"] else BLOCK_N, **meta)
    return o, lse, (qr, kr) if training else (q, k)


def _tail(n: int, block: int) -> int:
    """Width of the last, partial tile of n rows in blocks of `block`: a power of two >= 16 (tl.dot's minimum)."""
    rem = n % block
    return block if rem == 0 else min(block, max(16, 1 << (rem - 1).bit_length()))  # next power of two


def _use_fused_bwd(cfg: dict, n_q: int, n_kv: int) -> bool:
    if _BWD_PATH == "auto":
        return max(n_q, n_kv) <= cfg["bwd_fused_max_n"]
    return _BWD_PATH == "fused"


def _backward(do, q, k, v, o, lse, rope, scale, launch=None):
    """q, k: rotated (from `_forward(save_rotated=True)`) with RoPE, else the inputs -> dq, dk, dv.

    Fused path (one launch, B*H programs) up to cfg["bwd_fused_max_n"] tokens, else split (three launches)."""
    launch = launch or _launch
    B, H, N_Q, D = q.shape
    N_KV = k.shape[2]
    meta = _meta(q, rope)
    cfg = _configs(q, meta["BLOCK_D"])
    cos, sin, stab_h, stab_n, P = _table_args(rope, q)
    delta = torch.empty_like(lse)
    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=v.dtype) for t in (q, k, v))
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    sizes = (H, N_Q, N_KV, P, scale * _LOG2E, scale)
    if _use_fused_bwd(cfg, N_Q, N_KV):
        dq_acc = torch.empty(B * H, N_Q, D, device=q.device, dtype=torch.float32)  # every row written before read
        BLOCK_M, BLOCK_N, warps, stages = cfg["bwd_fused"]
        launch(_bwd_fused_kernel, (_grid(1, 1, B * H),),
               (q, k, v, o, do, lse, delta, dq_acc, dq, dk, dv, cos, sin, *common, *o.stride(), *dq.stride(),
                *dk.stride(), *dv.stride(), stab_h, stab_n, *sizes),
               warps, stages, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **meta)
        return dq, dk, dv
    PRE_M = 64
    launch(_bwd_preprocess, (_grid(N_Q, PRE_M, B * H),), (o, do, delta, *o.stride(), *do.stride(), H, N_Q),
           4, 1, HEAD_D=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=PRE_M)
    BLOCK_M, BLOCK_N, warps, stages = cfg["dkdv"]
    launch(_bwd_dkdv_kernel, (_grid(N_KV, BLOCK_N, B * H),),
           (q, k, v, do, lse, delta, dk, dv, cos, sin, *common, *dk.stride(), *dv.stride(), stab_h, stab_n, *sizes),
           warps, stages, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **meta)
    BLOCK_M, BLOCK_N, warps, stages = cfg["dq"]
    launch(_bwd_dq_kernel, (_grid(N_Q, BLOCK_M, B * H),),
           (q, k, v, do, lse, delta, dq, cos, sin, *common, *dq.stride(), stab_h, stab_n, *sizes),
           warps, stages, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **meta)
    return dq, dk, dv


# First training call of a shape: its kernels (forward, and the backward's delta, dk/dv and dq; plus the rotation and
# the plain attention kernel from "prerotate_from_n" on) would compile one after another as the launches reach them,
# and each would then build its C launcher (a host-compiler run per kernel signature, triton 3.6) at its first
# launch. `_compile_ahead` plans the same launches with a launcher that only compiles (`kernel.warmup`), inside
# Triton's AsyncCompileMode, so they compile in parallel threads; then it builds their C launchers in parallel
# (into Triton's disk cache, where the first launches find them). The backward is planned with o standing in for
# the incoming gradient (the same layout in the usual case; another layout just compiles its own kernels at the
# backward, as without this). Keyed on exact shapes and strides: a new batch size plans again, and then finds
# every kernel in Triton's cache.
def _compile_ahead_switch(value: str | None) -> bool:
    """ATTNHUB_TRITON_COMPILE_AHEAD: unset, empty or "1" compiles ahead (where Triton can), "0" does not."""
    if value not in (None, "", "0", "1"):
        raise ValueError(f"ATTNHUB_TRITON_COMPILE_AHEAD={value!r}: expected 0 or 1")
    return value != "0"


# Read once, at import; tests and benchmarks assign this module variable.
_COMPILE_AHEAD = (_compile_ahead_switch(os.environ.get("ATTNHUB_TRITON_COMPILE_AHEAD"))
                  and not _INTERPRET and hasattr(triton, "AsyncCompileMode"))
_AHEAD_DONE: set = set()
_AHEAD_MAX = 4096


@functools.lru_cache(maxsize=1)
def _compile_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="attnhub-compile")


def _compile_only(kernel, grid: tuple, args: tuple, num_warps: int, num_stages: int, **constexprs):
    """-> the compiled kernel, or a `triton.FutureKernel` inside AsyncCompileMode."""
    return kernel.warmup(*args, grid=grid, num_warps=num_warps, num_stages=num_stages, **constexprs)


def _build_launchers(kernels: list) -> None:
    """Build the C launchers of compiled kernels not yet loaded, in parallel (they land in Triton's disk cache)."""
    from triton.runtime import driver

    builds = [_compile_pool().submit(driver.active.launcher_cls, kernel.src, kernel.metadata)
              for kernel in kernels if kernel is not None and getattr(kernel, "module", None) is None]
    for build in builds:
        build.result()


def _compile_ahead(q, k, v, rope, scale) -> None:
    """Compile the kernels of a training forward and backward of this call's shapes, and their launchers, in
    parallel (once per key).

    Only an optimization: should planning or compiling fail, a warning says so and the launches compile (and
    report their own errors) as they would without it."""
    key = (q.device, q.dtype, q.shape, k.shape, q.stride(), k.stride(), v.stride(),
           None if rope is None else (rope.layout, rope.per_head, rope.prefix_tokens, rope.cos.dtype))
    if key in _AHEAD_DONE:
        return
    if len(_AHEAD_DONE) >= _AHEAD_MAX:
        _AHEAD_DONE.clear()
    _AHEAD_DONE.add(key)
    on_device = torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()
    planned = []

    def plan(*args, **kwargs):
        planned.append(_compile_only(*args, **kwargs))

    try:
        with on_device, triton.AsyncCompileMode(_compile_pool(), ignore_errors=True):
            o, lse, (q_saved, k_saved) = _forward(q, k, v, rope, scale, True, launch=plan)
            _backward(o, q_saved, k_saved, v, o, lse, rope, scale, launch=plan)
        _build_launchers([p.result(ignore_errors=True) if isinstance(p, triton.FutureKernel) else p
                          for p in planned])
    except Exception as exc:  # noqa: BLE001 - the launches that follow compile and raise on their own
        log.warning("triton_fa_rope: compiling ahead failed (%s: %s); kernels compile at their launches",
                    type(exc).__name__, exc)


# --------------------------------------------------------------------------------------------------- autograd
def _table_grad(rope, q, k, dq, dk) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the loss w.r.t. rope.cos and rope.sin ([N_grid, D/2] or [H, N_grid, D/2]), in PyTorch.

    q, k: [B, H, N, D] the unrotated inputs; dq, dk: the kernels' gradients w.r.t. them. A pair (a, b) rotates to
    (a c - b s, b c + a s); its gradient g w.r.t. the rotated pair is R dx = (dxa c - dxb s, dxb c + dxa s), so
    dL/dc = sum(g . (a, b)) = c U + s W and dL/ds = sum(g . (-b, a)) = s U - c W with U = sum(dxa a + dxb b),
    W = sum(dxa b - dxb a) over the batch (and the heads for a shared table), for q and k. fp32 (fp64 tables stay
    fp64); prefix tokens do not rotate and contribute nothing.
    """
    P, ct = rope.prefix_tokens, torch.promote_types(rope.cos.dtype, torch.float32)
    U = W = 0
    for x, dx in ((q, dq), (k, dk)):  # pairs of the patch tokens: [B, H, N_grid, D/2] each
        (a, b), (ga, gb) = (split_pairs(t[:, :, P:].to(ct), rope.layout) for t in (x, dx))
        U = U + (ga * a + gb * b).sum(0)
        W = W + (ga * b - gb * a).sum(0)
    if not rope.per_head:
        U, W = U.sum(0), W.sum(0)
    cos, sin = rope.cos.detach().to(ct), rope.sin.detach().to(ct)
    return (cos * U + sin * W).to(rope.cos.dtype), (sin * U - cos * W).to(rope.sin.dtype)


class _FlashRopeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, rope, scale):
        """cos, sin: rope's tables (None without RoPE), inputs only so that autograd hands back their gradients."""
        table_grad = any(ctx.needs_input_grad[3:5])
        training = any(ctx.needs_input_grad[:3]) or table_grad
        if training and _COMPILE_AHEAD and q.is_cuda:
            _compile_ahead(q, k, v, rope, scale)
        o, lse, (q_saved, k_saved) = _forward(q, k, v, rope, scale, save_rotated=training)
        if training:  # with a learnable table, the unrotated q and k too (its gradient needs them)
            ctx.save_for_backward(q_saved, k_saved, v, o, lse, *((q, k) if table_grad else ()))
            ctx.rope, ctx.scale = rope, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *unrotated = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.rope, ctx.scale)
        dcos, dsin = _table_grad(ctx.rope, *unrotated, dq, dk) if unrotated else (None, None)
        return dq, dk, dv, dcos, dsin, None, None


# ------------------------------------------------------------------------------------- torch.compile operators
# Inside torch.compile the kernels run as custom operators, opaque to the compiler (fake implementations give
# it shapes and strides), with the same forward/backward functions as the eager `autograd.Function` above.
# Eager calls skip the operator layer: it costs tens of microseconds of host time per call.
class _Table(NamedTuple):
    """The parts of a `CosSinTable` the kernels read; cos, sin: [N_grid, D/2] or [H, N_grid, D/2]."""

    cos: torch.Tensor
    sin: torch.Tensor
    prefix_tokens: int
    layout: str

    @property
    def per_head(self) -> bool:
        return self.cos.dim() == 3


def _op_table(cos, sin, prefix: int, layout: str) -> _Table | None:
    return None if layout == "none" else _Table(cos, sin, prefix, layout)


@torch.library.custom_op("attnhub::triton_fa_rope_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    prefix: int, layout: str, scale: float, save_rotated: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> o [B, H, N, D], lse [B*H, N] fp32, rotated q and k (or empty when not saved)."""
    rope = _op_table(cos, sin, prefix, layout)
    o, lse, (qr, kr) = _forward(q, k, v, rope, scale, save_rotated)
    if not (save_rotated and rope is not None):
        qr, kr = q.new_empty(0), k.new_empty(0)
    return o, lse, qr, kr


@_fwd_op.register_fake
def _(q, k, v, cos, sin, prefix, layout, scale, save_rotated):
    B, H, N_Q, D = q.shape
    lse = q.new_empty(B * H, N_Q, dtype=torch.float32)
    if save_rotated and layout != "none":
        rot_dtype = _rot_dtype(q.dtype)
        qr, kr = q.new_empty(q.shape, dtype=rot_dtype), k.new_empty(k.shape, dtype=rot_dtype)
    else:
        qr, kr = q.new_empty(0), k.new_empty(0)
    return _output_like(q), lse, qr, kr


@torch.library.custom_op("attnhub::triton_fa_rope_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], prefix: int, layout: str, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k: rotated (saved by the forward) with RoPE -> dq, dk, dv."""
    return _backward(do, q, k, v, o, lse, _op_table(cos, sin, prefix, layout), scale)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, cos, sin, prefix, layout, scale):
    return tuple(torch.empty(t.shape, device=t.device, dtype=v.dtype) for t in (q, k, v))


def _op_setup_context(ctx, inputs, output):
    q, k, v, cos, sin, prefix, layout, scale, _ = inputs
    o, lse, qr, kr = output
    rotated = layout != "none"
    table_grad = rotated and (cos.requires_grad or sin.requires_grad)
    ctx.save_for_backward(qr if rotated else q, kr if rotated else k, v, o, lse, cos, sin,
                          *((q, k) if table_grad else ()))
    ctx.prefix, ctx.layout, ctx.scale = prefix, layout, scale


def _op_backward(ctx, do, _dlse, _dqr, _dkr):
    q, k, v, o, lse, cos, sin, *unrotated = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, cos, sin, ctx.prefix, ctx.layout, ctx.scale)
    dcos = dsin = None
    if unrotated:
        dcos, dsin = _table_grad(_Table(cos, sin, ctx.prefix, ctx.layout), *unrotated, dq, dk)
    return dq, dk, dv, dcos, dsin, None, None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ------------------------------------------------------------------------------------------------------ entry
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: CosSinTable | None, scale: float
) -> torch.Tensor:
    """q: [B, H, N, D], k, v: [B, H, N_kv, D] -> o: [B, H, N, D] in q's dtype (memory layout [B, N, H, D])."""
    if torch.compiler.is_compiling():
        training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                                or (rope is not None and rope.requires_grad))
        if rope is None:
            return _fwd_op(q, k, v, None, None, 0, "none", scale, training)[0]
        return _fwd_op(q, k, v, rope.cos, rope.sin, rope.prefix_tokens, rope.layout, scale, training)[0]
    if rope is None:
        return _FlashRopeAttention.apply(q, k, v, None, None, None, scale)
    return _FlashRopeAttention.apply(q, k, v, rope.cos, rope.sin, rope, scale)
