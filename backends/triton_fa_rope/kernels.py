"""The Triton kernels of triton_fa_rope: jit helpers, the forward and rotation kernels, the backward kernels.

Only `@triton.jit` code; `launch.py` chooses configs, grids and strides. How RoPE is fused: the kernels load a q or
k tile as two pair tiles `[BLOCK, D/2]` (interleaved: one contiguous row load split in registers; half: two
contiguous half-row loads), rotate them in fp32 with the `[N_grid, D/2]` cos/sin table, and join them back into
one `[BLOCK, D]` tile in the order `(a_0, b_0, a_1, b_1, ...)`. The same channel permutation on q and k leaves
`q . k` unchanged, so one `tl.dot` over D computes the scores. The backward kernels get q and k already rotated
(saved by the training forward) and rotate only dq and dk back, by R^T, when they store them.

Variable-resolution batches, each a compile-time switch (off: the code of a plain call is unchanged):
KEY_MASK reads a key padding mask KPM ([B, N_KV] uint8, 1 = attend) and gives masked keys probability 0 (their v
enters as 0 * v, as in `math`); per sample, key tiles before the first masked key run without the mask and tiles
after the last valid key are skipped (KBOUNDS, from `key_bounds_kernel`); a query row without any valid key gets
o = 0 and lse = +inf, so the backward's P is exactly 0 there. GROUP = H / H_kv query
heads share one k/v head (head h reads k/v head h // GROUP, never a repeated copy); the dk/dv program of a k/v head
loops over its GROUP query heads in order (deterministic, no atomics). BATCHED_TABLE: one cos/sin table per sample
(batch stride stab_b).

Numerics: fp32 accumulation, online softmax in base 2 with the log-sum-exp kept in fp32 for the backward.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    xa, xb = _load_pairs(base, offs_n, mask_n, stride_n, stride_d, offs_j, offs_d, HEAD_D2, BLOCK_D2, PAIR_STEP,
                         PAIR_OFF, SPLIT)
    c, s = _table(cos_base, sin_base, offs_n, mask_n, stride_tn, P, offs_j, HEAD_D2, BLOCK_D2)
    return _rotate_pairs(xa, xb, c, s, DOT)


@triton.jit
def _load_pairs(base, offs_n, mask_n, stride_n, stride_d, offs_j, offs_d, HEAD_D2: tl.constexpr,
                BLOCK_D2: tl.constexpr, PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr):
    """The rotary pairs (a, b) of a q or k tile: two [BLOCK, BLOCK_D2] tiles in the input dtype."""
    if SPLIT:  # interleaved pairs, D a power of two: one vectorized row load, pairs separated in registers
        x = tl.load(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask_n[:, None],
                    other=0.0)
        xa, xb = tl.split(tl.reshape(x, [offs_n.shape[0], BLOCK_D2, 2]))
    else:
        mask = _pair_mask(mask_n, offs_j, HEAD_D2, BLOCK_D2)
        ptr = base + offs_n[:, None] * stride_n + (offs_j * PAIR_STEP)[None, :] * stride_d
        xa = tl.load(ptr, mask=mask, other=0.0)
        xb = tl.load(ptr + PAIR_OFF * stride_d, mask=mask, other=0.0)
    return xa, xb


@triton.jit
def _rotate_pairs(xa, xb, c, s, DOT: tl.constexpr):
    """R (a, b) = (a c - b s, b c + a s) in fp32 -> [BLOCK, 2 * BLOCK_D2] in the dot dtype, joined pair order."""
    xa = xa.to(tl.float32)
    xb = xb.to(tl.float32)
    ra = (xa * c - xb * s).to(DOT)
    rb = (xb * c + xa * s).to(DOT)
    return tl.reshape(tl.join(ra, rb), [xa.shape[0], 2 * xa.shape[1]])


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
def _table_bases(COS, SIN, b, h, stab_b, stab_h, BATCHED_TABLE: tl.constexpr):
    """The cos and sin [N_grid, D/2] rows of sample b, head h (stab_h is 0 for a table shared by the heads)."""
    off = h * stab_h
    if BATCHED_TABLE:
        off += b * stab_b
    return COS + off, SIN + off


@triton.jit
def _key_keep(kpm_base, offs_n, mask_n):
    """Keys in range (mask_n) that the key padding mask lets queries attend: [BLOCK] bool."""
    return mask_n & (tl.load(kpm_base + offs_n, mask=mask_n, other=0) != 0)


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


@triton.jit
def key_bounds_kernel(KPM, KBOUNDS, N_KV, smb, BLOCK: tl.constexpr):
    """One program per sample b: KBOUNDS[b] = (its first masked key, N_KV if none; one past its last valid key, 0
    if none) from the key padding mask KPM [B, N_KV] uint8 (row stride smb)."""
    b = tl.program_id(0).to(tl.int64)
    first = tl.full([BLOCK], N_KV, tl.int32)
    end = tl.zeros([BLOCK], tl.int32)
    for start in range(0, N_KV, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_range = offs < N_KV
        keep = tl.load(KPM + b * smb + offs, mask=in_range, other=0) != 0
        first = tl.minimum(first, tl.where(in_range & ~keep, offs, N_KV))
        end = tl.maximum(end, tl.where(keep, offs + 1, 0))
    tl.store(KBOUNDS + 2 * b, tl.min(first, 0))
    tl.store(KBOUNDS + 2 * b + 1, tl.max(end, 0))


# ---------------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tile(q, m_i, l_i, acc, k_base, v_base, kpm_base, start_n, N_KV, skn, skd, svn, svd, cos_base, sin_base,
              stab_n, P, qk_scale, offs_j, offs_d, KR_base, n_m, pid_m, h,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
              PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
              MASK: tl.constexpr, SAVE_ROT: tl.constexpr, GROUP: tl.constexpr, KEY_MASK: tl.constexpr):
    """One K/V tile of the online softmax. MASK: the tile reaches past N_KV (only the last one does)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK:
        mask_n = offs_n < N_KV
    else:
        mask_n = tl.full([BLOCK_N], 1, tl.int1)
    if KEY_MASK:
        keep = _key_keep(kpm_base, offs_n, mask_n)
    else:
        keep = mask_n
    k = _load_qk(k_base, offs_n, mask_n, skn, skd, cos_base, sin_base, stab_n, P, offs_j, offs_d,
                 HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE, DOT)
    if SAVE_ROT:  # K tile t is saved by one program of its k/v head: t mod (n_m GROUP) = pid_m GROUP + h mod GROUP
        if (start_n // BLOCK_N) % (n_m * GROUP) == pid_m * GROUP + h % GROUP:
            _store_rows(KR_base, k, offs_n, mask_n, HEAD_D, 1, offs_d, HEAD_D, BLOCK_D)
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
    # the scale enters each exponent as one fused multiply-add, s * scale - m, and the row max as the raw scores'
    # max (min for a negative scale) times it; a masked tile is scaled first, its -inf the least for either sign
    scale = qk_scale
    if MASK or KEY_MASK:
        s = tl.where(keep[None, :], s * qk_scale, float("-inf"))
        scale = 1.0
        m_raw = tl.max(s, 1)
    elif qk_scale >= 0:
        m_raw = tl.max(s, 1)
    else:
        m_raw = tl.min(s, 1)
    m_new = tl.maximum(m_i, m_raw * scale)
    m_ref = m_new
    if KEY_MASK:  # a row whose keys so far are all masked has m = -inf: exponents against 0 give 0, not NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(s * scale - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # masked keys have p = 0; v is read within bounds only (a load mask taken from KPM slowed the tile loop)
    v = _load_rows(v_base, offs_n, mask_n, svn, svd, offs_d, HEAD_D, BLOCK_D)
    acc = _dot(p.to(DOT), v.to(DOT), acc * alpha[:, None], PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["H", "P"])  # head count and prefix length: no recompiles across models
def fwd_kernel(
    Q, K, V, O, LSE, COS, SIN, QR, KR, KPM, KBOUNDS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, stab_b, stab_h, stab_n, smb,
    H, N_Q, N_KV, P, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    SAVE_ROT: tl.constexpr, ROPE_K: tl.constexpr, TAIL_N: tl.constexpr,
    GROUP: tl.constexpr, BATCHED_TABLE: tl.constexpr, KEY_MASK: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (b, h). O: [B, H, N_Q, D]; LSE: [B*H, N_Q] fp32, base 2.

    K, V: [B, H / GROUP, N_KV, D]. KPM: the key padding mask [B, N_KV] (row stride smb) with KEY_MASK; KBOUNDS
    [B, 2] int32: each sample's first masked key (N_KV if none) and one past its last valid key. K tiles before
    the first run without the mask; the loop stops at the second (all later keys are masked).
    SAVE_ROT (training with RoPE): also write the rotated q and k tiles to QR [B*H, N, D] and KR [B*H/GROUP, N, D]
    (joined order). ROPE_K: rotate the K tiles (only with ROPE; False when K arrives pre-rotated by `rotate_kernel`).
    TAIL_N: the width of the last, masked K tile (BLOCK_N, or with "narrow_tail" N_KV % BLOCK_N rounded up to a
    power of two >= 16: at ViT lengths, 197 = 3 * 64 + 5, a full-width tile computes 59 padded keys for 5 real ones).
    """
    n_m = tl.cdiv(N_Q, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    bh, b, h, offs_m, mask_m = _program_rows(N_Q, H, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_D2)
    offs_d = tl.arange(0, BLOCK_D)
    cos_base, sin_base = _table_bases(COS, SIN, b, h, stab_b, stab_h, BATCHED_TABLE)

    q = _load_qk(Q + b * sqb + h * sqh, offs_m, mask_m, sqn, sqd, cos_base, sin_base, stab_n, P, offs_j, offs_d,
                 HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE, DOT)
    rot_base = bh.to(tl.int64) * N_Q * HEAD_D
    if SAVE_ROT:
        _store_rows(QR + rot_base, q, offs_m, mask_m, HEAD_D, 1, offs_d, HEAD_D, BLOCK_D)
    kr_base = KR + (bh // GROUP).to(tl.int64) * N_Q * HEAD_D  # KR: [B*H/GROUP, N, D]; RoPE has N_KV = N_Q
    hk = h // GROUP
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    kpm_base = KPM + b * smb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    n_loop = n_full
    run_tail = n_full < N_KV
    n_dense = n_loop
    if KEY_MASK:  # tiles before the first masked key need no mask; those past the last valid key are skipped
        n_dense = tl.minimum(n_full, (tl.load(KBOUNDS + 2 * b) // BLOCK_N) * BLOCK_N)
        n_stop = tl.load(KBOUNDS + 2 * b + 1)
        n_loop = tl.minimum(n_full, tl.cdiv(n_stop, BLOCK_N) * BLOCK_N)
        run_tail = n_stop > n_full
    for start_n in range(0, n_dense, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, kpm_base, start_n, N_KV, skn, skd, svn, svd,
                                  cos_base, sin_base, stab_n, P, qk_scale, offs_j, offs_d, kr_base, n_m, pid_m, h,
                                  HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE_K,
                                  BLOCK_M, BLOCK_N, DOT, PRECISION, False, SAVE_ROT, GROUP, False)
    if KEY_MASK:
        for start_n in range(n_dense, n_loop, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, kpm_base, start_n, N_KV, skn, skd, svn,
                                      svd, cos_base, sin_base, stab_n, P, qk_scale, offs_j, offs_d, kr_base, n_m,
                                      pid_m, h, HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT,
                                      ROPE_K, BLOCK_M, BLOCK_N, DOT, PRECISION, False, SAVE_ROT, GROUP, True)
    if run_tail:
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, k_base, v_base, kpm_base, n_full, N_KV, skn, skd, svn, svd,
                                  cos_base, sin_base, stab_n, P, qk_scale, offs_j, offs_d, kr_base, n_m, pid_m, h,
                                  HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE_K,
                                  BLOCK_M, TAIL_N, DOT, PRECISION, True, SAVE_ROT, GROUP, KEY_MASK)

    if KEY_MASK:  # a row without a valid key has l = 0 and acc = 0: o = 0, and lse = +inf makes the backward's P 0
        empty = l_i == 0.0
        l_i = tl.where(empty, 1.0, l_i)
    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)
    if KEY_MASK:
        lse = tl.where(empty, float("inf"), lse)
    _store_rows(O + b * sob + h * soh, acc, offs_m, mask_m, son, sod, offs_d, HEAD_D, BLOCK_D)
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, lse, mask=mask_m)


@triton.jit(do_not_specialize=["H", "H2", "P"])
def rotate_kernel(
    X, X2, XR, XR2, COS, SIN, sxb, sxh, sxn, sxd, sx2b, sx2h, sx2n, sx2d, stab_b, stab_h, stab_n, H, H2, N, P,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BATCHED_TABLE: tl.constexpr, TWO: tl.constexpr,
):
    """One program: BLOCK_M rows of one (b, h) of X [B, H, N, D] and, with TWO and h < H2, the same rows of X2
    [B, H2, N, D] (k beside q: one table load for both; H2 <= H, grouped k/v heads), any strides, rotated into XR
    [B*H, N, D] and XR2 [B*H2, N, D] (contiguous, joined pair order, the dot dtype)."""
    bh, b, h, offs_m, mask_m = _program_rows(N, H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_D2)
    cos_base, sin_base = _table_bases(COS, SIN, b, h, stab_b, stab_h, BATCHED_TABLE)
    c, s = _table(cos_base, sin_base, offs_m, mask_m, stab_n, P, offs_j, HEAD_D2, BLOCK_D2)
    xa, xb = _load_pairs(X + b * sxb + h * sxh, offs_m, mask_m, sxn, sxd, offs_j, offs_d, HEAD_D2, BLOCK_D2,
                         PAIR_STEP, PAIR_OFF, SPLIT)
    x = _rotate_pairs(xa, xb, c, s, DOT)
    _store_rows(XR + bh.to(tl.int64) * N * HEAD_D, x, offs_m, mask_m, HEAD_D, 1, offs_d, HEAD_D, BLOCK_D)
    if TWO:
        if h < H2:
            xa, xb = _load_pairs(X2 + b * sx2b + h * sx2h, offs_m, mask_m, sx2n, sx2d, offs_j, offs_d, HEAD_D2,
                                 BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT)
            x = _rotate_pairs(xa, xb, c, s, DOT)
            _store_rows(XR2 + (b * H2 + h) * N * HEAD_D, x, offs_m, mask_m, HEAD_D, 1, offs_d, HEAD_D, BLOCK_D)


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
    MASK_N: P^T = 0 on the rows of keys not in mask_n: keys past N_KV, where dS feeds dq (their k rows are
    zero-padded, so dS k adds 0 for finite values anyway; the mask keeps an infinite P from making it NaN, as in the
    split dq kernel), or keys the key padding mask hides (the split dk/dv kernel: exactly zero dk, dv)."""
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
def bwd_preprocess(O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, H, N_Q,
                    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Split path. One program: DELTA [B*H, N_Q] fp32 of BLOCK_M query rows of one (b, h)."""
    bh, b, h, offs_m, mask_m = _program_rows(N_Q, H, BLOCK_M)
    _bwd_delta(O + b * sob + h * soh, DO + b * sdob + h * sdoh, DELTA + bh.to(tl.int64) * N_Q, offs_m,
               mask_m, son, sod, sdon, sdod, tl.arange(0, BLOCK_D), HEAD_D, BLOCK_D)


@triton.jit
def _bwd_dkdv_head(k, v, dk, dv, keep, Q, DO, LSE, DELTA, b, h, bh, sqb, sqh, sqn, sqd, sdob, sdoh, sdon, sdod,
                   N_Q, m_stop, qk_scale, offs_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, KEY_MASK: tl.constexpr):
    """dk, dv [BLOCK_N, BLOCK_D] fp32 of one key block accumulated over the queries [0, m_stop) of query head h
    (bh = b H + h; m_stop: N_Q, or 0 for a block of masked keys only)."""
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    row_base = bh.to(tl.int64) * N_Q
    for start_m in range(0, m_stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do, lse, delta = _bwd_q_block(q_base, do_base, LSE + row_base, DELTA + row_base, offs_m, offs_m < N_Q,
                                         sqn, sqd, sdon, sdod, offs_d, HEAD_D, BLOCK_D, DOT)
        # rows past N_KV are not stored; masked keys (KEY_MASK) get P = 0, so exactly zero dk and dv
        dk, dv, _ = _bwd_kv_tile(k, v, q, do, lse, delta, dk, dv, keep, qk_scale,
                                 BLOCK_M, BLOCK_N, DOT, PRECISION, KEY_MASK)
    return dk, dv


@triton.jit(do_not_specialize=["H", "P"])  # head count and prefix length: no recompiles across models
def bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, COS, SIN, KPM, KBOUNDS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, stab_b, stab_h, stab_n, smb,
    H, N_Q, N_KV, P, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, BATCHED_TABLE: tl.constexpr, KEY_MASK: tl.constexpr,
):
    """Split path. One program: dk, dv for BLOCK_N keys of one (b, k/v head), looping over all queries of the
    GROUP query heads that share it, in order (the group's sum without atomics). H: query heads."""
    bhk, b, hk, offs_n, mask_n = _program_rows(N_KV, H // GROUP, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_D2)
    offs_d = tl.arange(0, BLOCK_D)

    m_stop = N_Q
    if KEY_MASK:
        keep = _key_keep(KPM + b * smb, offs_n, mask_n)
        # a block past the sample's last valid key: dk = dv = 0 without visiting the queries
        m_stop = tl.where((tl.program_id(0) % tl.cdiv(N_KV, BLOCK_N)) * BLOCK_N < tl.load(KBOUNDS + 2 * b + 1),
                          N_Q, 0)
    else:
        keep = mask_n
    k = _load_rows(K + b * skb + hk * skh, offs_n, keep, skn, skd, offs_d, HEAD_D, BLOCK_D).to(DOT)
    v = _load_rows(V + b * svb + hk * svh, offs_n, keep, svn, svd, offs_d, HEAD_D, BLOCK_D).to(DOT)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        dk, dv = _bwd_dkdv_head(k, v, dk, dv, keep, Q, DO, LSE, DELTA, b, hk * GROUP + g, bhk * GROUP + g, sqb,
                                sqh, sqn, sqd, sdob, sdoh, sdon, sdod, N_Q, m_stop, qk_scale, offs_d, HEAD_D,
                                BLOCK_D, BLOCK_M, BLOCK_N, DOT, PRECISION, KEY_MASK)

    cos_base, sin_base = _table_bases(COS, SIN, b, hk, stab_b, stab_h, BATCHED_TABLE)  # per-head tables: GROUP = 1
    _bwd_store_dkdv(DK + b * sdkb + hk * sdkh, DV + b * sdvb + hk * sdvh, dk, dv, scale, offs_n, mask_n,
                    sdkn, sdkd, sdvn, sdvd, cos_base, sin_base, stab_n, P, offs_j, offs_d,
                    HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, kpm_base, start_n, N_KV, skn, skd, svn, svd, offs_d, qk_scale,
             HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT: tl.constexpr, PRECISION: tl.constexpr, KEY_MASK: tl.constexpr):
    """dq [BLOCK_M, BLOCK_D] fp32 plus dS k of the BLOCK_N keys from start_n (KEY_MASK: the mask applies in this
    block). k and v are read within bounds only: masked keys get P = 0, so dS = 0 there (as in `math`)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_KV
    if KEY_MASK:
        keep = _key_keep(kpm_base, offs_n, mask_n)
    else:
        keep = mask_n
    k = _load_rows(k_base, offs_n, mask_n, skn, skd, offs_d, HEAD_D, BLOCK_D).to(DOT)
    v = _load_rows(v_base, offs_n, mask_n, svn, svd, offs_d, HEAD_D, BLOCK_D).to(DOT)
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    p = tl.where(keep[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
    ds = (p * (dp - delta[:, None])).to(DOT)
    return _dot(ds, k, dq, PRECISION)


@triton.jit(do_not_specialize=["H", "P"])  # head count and prefix length: no recompiles across models
def bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, COS, SIN, KPM, KBOUNDS,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd, stab_b, stab_h, stab_n, smb,
    H, N_Q, N_KV, P, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    GROUP: tl.constexpr, BATCHED_TABLE: tl.constexpr, KEY_MASK: tl.constexpr,
):
    """Split path. One program: dq for BLOCK_M queries of one (b, h), looping over all keys (of k/v head
    h // GROUP)."""
    bh, b, h, offs_m, mask_m = _program_rows(N_Q, H, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_D2)
    offs_d = tl.arange(0, BLOCK_D)

    row_base = bh.to(tl.int64) * N_Q
    q, do, lse, delta = _bwd_q_block(Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, LSE + row_base,
                                     DELTA + row_base, offs_m, mask_m, sqn, sqd, sdon, sdod, offs_d,
                                     HEAD_D, BLOCK_D, DOT)
    hk = h // GROUP
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    kpm_base = KPM + b * smb

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_dense = 0
    n_stop = N_KV
    if KEY_MASK:  # as in the forward: key blocks before the first masked key without the mask, none after the last
        n_dense = (tl.minimum(N_KV, tl.load(KBOUNDS + 2 * b)) // BLOCK_N) * BLOCK_N
        n_stop = tl.minimum(N_KV, tl.load(KBOUNDS + 2 * b + 1))
        for start_n in range(0, n_dense, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, kpm_base, start_n, N_KV, skn, skd, svn, svd, offs_d,
                          qk_scale, HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, DOT, PRECISION, False)
    for start_n in range(n_dense, n_stop, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, kpm_base, start_n, N_KV, skn, skd, svn, svd, offs_d,
                      qk_scale, HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, DOT, PRECISION, KEY_MASK)

    cos_base, sin_base = _table_bases(COS, SIN, b, h, stab_b, stab_h, BATCHED_TABLE)
    _store_grad_qk(DQ + b * sdqb + h * sdqh, dq * scale, offs_m, mask_m, sdqn, sdqd, cos_base, sin_base, stab_n,
                   P, offs_j, offs_d, HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE)


@triton.jit(do_not_specialize=["H", "P"])  # head count and prefix length: no recompiles across models
def bwd_fused_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQACC, DQ, DK, DV, COS, SIN,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod, sob, soh, son, sod,
    sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, stab_h, stab_n,
    H, N_Q, N_KV, P, qk_scale, scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    SINGLE_M: tl.constexpr,
):
    """Fused path. One program: the whole backward of one (b, h), in one pass over the scores.

    SINGLE_M (N_Q <= BLOCK_M, short sequences): q, dO, lse and delta (computed here from O and dO) stay resident
    for the whole program and dq accumulates in registers; DELTA and DQACC are not touched. Otherwise pass 0 writes
    DELTA [B*H, N_Q] fp32, and each query block's dq contribution dS k is added into the scratch DQACC [B*H, N_Q, D]
    fp32 (read-modify-write; the first key block only writes), rotated back into DQ by a last pass. That path
    re-reads what its own threads wrote with other thread-element mappings, hence the barriers.
    In both, the main loop takes BLOCK_N keys at a time against all queries (dk, dv as in the split dk/dv kernel).
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

    if SINGLE_M:
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_Q
        do = _load_rows(do_base, offs_m, mask_m, sdon, sdod, offs_d, HEAD_D, BLOCK_D)
        o = _load_rows(O + b * sob + h * soh, offs_m, mask_m, son, sod, offs_d, HEAD_D, BLOCK_D)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        do = do.to(DOT)
        q = _load_rows(q_base, offs_m, mask_m, sqn, sqd, offs_d, HEAD_D, BLOCK_D).to(DOT)
        lse = tl.load(lse_base + offs_m, mask=mask_m, other=float("inf"))  # padded rows: P = 0
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, N_KV, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N_KV
            k = _load_rows(k_base, offs_n, mask_n, skn, skd, offs_d, HEAD_D, BLOCK_D).to(DOT)
            v = _load_rows(v_base, offs_n, mask_n, svn, svd, offs_d, HEAD_D, BLOCK_D).to(DOT)
            # query-major products (the M = BLOCK_M side feeds the tensor cores' wide dimension)
            s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
            p = tl.where(mask_n[None, :], tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
            dv = _dot(tl.trans(p.to(DOT)), do, tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), PRECISION)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PRECISION)
            ds = (p * (dp - delta[:, None])).to(DOT)
            dk = _dot(tl.trans(ds), q, tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), PRECISION)
            dq = _dot(ds, k, dq, PRECISION)
            _bwd_store_dkdv(DK + b * sdkb + h * sdkh, DV + b * sdvb + h * sdvh, dk, dv, scale, offs_n, mask_n,
                            sdkn, sdkd, sdvn, sdvd, cos_base, sin_base, stab_n, P, offs_j, offs_d,
                            HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT, ROPE)
        _store_grad_qk(DQ + b * sdqb + h * sdqh, dq * scale, offs_m, mask_m, sdqn, sdqd, cos_base, sin_base,
                       stab_n, P, offs_j, offs_d, HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT,
                       ROPE)
    else:  # several query blocks: delta and dq go through global scratch
        for start_m in range(0, N_Q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            _bwd_delta(O + b * sob + h * soh, do_base, delta_base, offs_m, offs_m < N_Q, son, sod, sdon, sdod,
                       offs_d, HEAD_D, BLOCK_D)
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
            _store_grad_qk(DQ + b * sdqb + h * sdqh, dq * scale, offs_m, mask_m, sdqn, sdqd, cos_base,
                           sin_base, stab_n, P, offs_j, offs_d, HEAD_D, BLOCK_D, HEAD_D2, BLOCK_D2, PAIR_STEP,
                           PAIR_OFF, SPLIT, ROPE)
