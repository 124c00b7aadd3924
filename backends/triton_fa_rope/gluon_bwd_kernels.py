"""The Gluon (`triton.experimental.gluon`) kernels of triton_fa_rope's split backward on Hopper; `gluon_bwd` plans
and launches them (what they compute, which calls take them and why: its docstring).

    gluon_dkdv_kernel    64 keys per warpgroup resident (K rotated by the forward), the rotated Q and dO streamed
                         through a TMA ring
    gluon_dq_kernel      its mirror: 64 queries per warpgroup resident, K and V streamed; it can compute delta
                         (rowsum(o * dO)) for the dK/dV kernel, then running first

A head's last resident block with at most 16 valid rows (577 = 9 * 64 + 1, 1029 = 16 * 64 + 5) can run swapped
(SWAP_K, SWAP_Q; config `bwd_swap_tail`): the streamed side as the MMA's 64 rows, the few resident ones as its N.

Read top-down: the ring and the resident block, the epilogue's stores and R^T, then each kernel after its steps.
Layouts and the table load are the forwards' (`gluon_kernels`). Written against Triton 3.6.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from attnhub.backends.triton_fa_rope.gluon_kernels import (
    _cta_barrier,
    _load_table,
    _mma_layout,
    _rot_layout,
    _swizzle,
    _tma_load,
)


@gluon.jit
def _issue_pair(a_desc, b_desc, a_dst, b_dst, bar, b, h, row0, pred):
    """TMA: rows row0.. of head (b, h) of two tensors (Q and dO, or K and V) -> bar (rows past N as zeros)."""
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
    _tma_load(a_desc, [b, row0, h, 0], bar, a_dst, pred=pred)
    _tma_load(b_desc, [b, row0, h, 0], bar, b_dst, pred=pred)


@gluon.jit
def _store_rows(base, x, row0, N, stride_n):
    """x [R, D] (a blocked layout) -> rows row0.. (those < N) of base, channels dense, in base's dtype."""
    layout: gl.constexpr = x.type.layout
    rows = row0 + gl.arange(0, x.shape[0], layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, x.shape[1], layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(rows.to(gl.int64) * stride_n, 1) + gl.expand_dims(cols, 0)
    gl.store(base + offs, x.to(base.dtype.element_ty), mask=gl.expand_dims(rows < N, 1))


@gluon.jit
def _rope_back(g, c, s):
    """g [R, D] fp32: a gradient w.r.t. rotated rows -> w.r.t. the rows before the rotation (R^T): each pair
    (a, b) -> (a cos + b sin, b cos - a sin)."""
    R: gl.constexpr = g.shape[0]
    D: gl.constexpr = g.shape[1]
    a, b = gl.split(gl.reshape(g, [R, D // 2, 2]))
    c = gl.convert_layout(c, a.type.layout)
    s = gl.convert_layout(s, a.type.layout)
    return gl.convert_layout(gl.reshape(gl.join(a * c + b * s, b * c - a * s), [R, D]), g.type.layout)


@gluon.jit
def _dkdv_step(k_s, v_s, q_s, do_s, dk, dv, lse_base, delta_base, col0, N, qk_scale, num_warps: gl.constexpr):
    """One block of W = q_s.shape[0] queries (col0..) against the program's keys: dk, dv [BLOCK_K, D] fp32 updated
    (waited for). Queries past N: lse +inf, so P^T = 0 there."""
    W: gl.constexpr = q_s.shape[0]
    BLOCK_K: gl.constexpr = k_s.shape[0]
    s_layout: gl.constexpr = _mma_layout(num_warps, W)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk.type.layout, k_width=2)
    cols = col0 + gl.arange(0, W, layout=gl.SliceLayout(0, s_layout))
    lse = gl.load(lse_base + cols, mask=cols < N, other=float("inf"))
    delta = gl.load(delta_base + cols, mask=cols < N, other=0.0)
    st = warpgroup_mma(k_s, q_s.permute((1, 0)), gl.zeros([BLOCK_K, W], gl.float32, s_layout), use_acc=False,
                       is_async=True)
    dpt = warpgroup_mma(v_s, do_s.permute((1, 0)), gl.zeros([BLOCK_K, W], gl.float32, s_layout), use_acc=False,
                        is_async=True)
    st = warpgroup_mma_wait(num_outstanding=1, deps=(st, ))
    pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
    dv = warpgroup_mma(gl.convert_layout(pt.to(q_s.dtype), op_layout), do_s, dv, is_async=True)
    dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt, ))
    dst = pt * (dpt - gl.expand_dims(delta, 0))
    dk = warpgroup_mma(gl.convert_layout(dst.to(q_s.dtype), op_layout), q_s, dk, is_async=True)
    dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
    return dk, dv


@gluon.jit
def _next_pair(a_desc, b_desc, a_buf, b_buf, bars, b, h, i, n_blocks):
    """Block i of the ring (a_buf, b_buf [STAGES, 1, ROWS, 1, D]) as [ROWS, D] shared views, once landed; first the
    load of block i + STAGES - 1 into the buffers of block i - 1 is issued (if it exists), after a CTA barrier:
    every warp is done with them."""
    STAGES: gl.constexpr = a_buf.shape[0]
    ROWS: gl.constexpr = a_buf.shape[2]
    D: gl.constexpr = a_buf.shape[4]
    nxt = i + STAGES - 1
    _cta_barrier()
    _issue_pair(a_desc, b_desc, a_buf.index(nxt % STAGES), b_buf.index(nxt % STAGES), bars.index(nxt % STAGES), b, h,
                nxt * ROWS, nxt < n_blocks)
    mbarrier.wait(bars.index(i % STAGES), (i // STAGES) & 1)
    return a_buf.index(i % STAGES).reshape([ROWS, D]), b_buf.index(i % STAGES).reshape([ROWS, D])


@gluon.jit
def _ring(a_desc, b_desc, STAGES: gl.constexpr):
    """The buffers [STAGES, 1, ROWS, 1, D] of a ring of two streamed tensors, and one mbarrier per stage."""
    a_buf = gl.allocate_shared_memory(a_desc.dtype, [STAGES, 1, a_desc.block_type.shape[1], 1,
                                                     a_desc.block_type.shape[3]], a_desc.layout)
    b_buf = gl.allocate_shared_memory(b_desc.dtype, [STAGES, 1, b_desc.block_type.shape[1], 1,
                                                     b_desc.block_type.shape[3]], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    return a_buf, b_buf, bars


@gluon.jit
def _block_and_ring(res_a_desc, res_b_desc, ring_a_desc, ring_b_desc, b, h, row0, N, STAGES: gl.constexpr):
    """A backward program's shared memory: one block of two resident tensors (rows row0.. of head (b, h), by TMA
    -> bar_res) and a ring of STAGES blocks of two streamed ones, the first STAGES - 1 in flight. -> resident
    [ROWS, D] views, bar_res, the ring's buffers and barriers, and the number of streamed blocks (the last one
    partial)."""
    ROWS: gl.constexpr = res_a_desc.block_type.shape[1]
    D: gl.constexpr = res_a_desc.block_type.shape[3]
    STREAM: gl.constexpr = ring_a_desc.block_type.shape[1]
    a_s4 = gl.allocate_shared_memory(res_a_desc.dtype, [1, ROWS, 1, D], res_a_desc.layout)
    b_s4 = gl.allocate_shared_memory(res_b_desc.dtype, [1, ROWS, 1, D], res_b_desc.layout)
    ring_a, ring_b, bars = _ring(ring_a_desc, ring_b_desc, STAGES)
    bar_res = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar_res, count=1)
    fence_async_shared()
    _cta_barrier()

    _issue_pair(res_a_desc, res_b_desc, a_s4, b_s4, bar_res, b, h, row0, True)
    n_blocks = gl.cdiv(N, STREAM)
    for i in gl.static_range(STAGES - 1):
        _issue_pair(ring_a_desc, ring_b_desc, ring_a.index(i), ring_b.index(i), bars.index(i), b, h, i * STREAM,
                    i < n_blocks)
    return a_s4.reshape([ROWS, D]), b_s4.reshape([ROWS, D]), bar_res, ring_a, ring_b, bars, n_blocks


@gluon.jit
def _release(bar_res, bars):
    """Invalidate `_block_and_ring`'s barriers."""
    STAGES: gl.constexpr = bars.shape[0]
    mbarrier.invalidate(bar_res)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def _store_grad(base, g, row0, N, stride_n, scale, cos_ptr, sin_ptr, h, stab_h, stab_n, P, ROPE: gl.constexpr,
                num_warps: gl.constexpr):
    """The epilogue of dK or dQ: g [R, D] fp32 (accumulator layout) * scale, rotated back by R^T with the table rows
    of tokens row0.. (ROPE), stored to rows row0.. (< N) of base."""
    R: gl.constexpr = g.shape[0]
    D: gl.constexpr = g.shape[1]
    g = gl.convert_layout(g * scale, _rot_layout(num_warps, D))
    if ROPE:
        c, s = _load_table(cos_ptr + h.to(gl.int64) * stab_h, sin_ptr + h.to(gl.int64) * stab_h, row0, N, P, stab_n,
                           R, D, num_warps)
        g = _rope_back(g, c, s)
    _store_rows(base, g, row0, N, stride_n)


@gluon.jit
def _dkdv_swapped(k_s, v_s, q_desc, do_desc, q_buf, do_buf, bars, t_buf, b, h, n_blocks, lse_base, delta_base, N,
                  qk_scale, num_warps: gl.constexpr):
    """The program's keys when at most TK = t_buf.shape[2] of them are valid (a head's last block), swapped: per
    query block S = Q K^T and dP = dO V^T with the 64 queries as the MMA's rows and the TK keys as its columns,
    P = exp2(S * qk_scale - lse), dS = P (dP - delta), then dV^T += dO^T P and dK^T += Q^T dS (P and dS through
    t_buf [2, BLOCK_M, TK] in shared memory) -> dk_t, dv_t [D, TK] fp32. Every query block whole (queries past N:
    lse +inf, so P = 0); keys past N (TMA's zero rows) get columns that are not stored."""
    TK: gl.constexpr = t_buf.shape[2]
    BLOCK_M: gl.constexpr = q_buf.shape[2]
    D: gl.constexpr = q_buf.shape[4]
    s_layout: gl.constexpr = _mma_layout(num_warps, TK)  # [BLOCK_M or D, TK] tiles
    k_t = k_s.slice(0, TK).permute((1, 0))  # [D, TK]
    v_t = v_s.slice(0, TK).permute((1, 0))
    p_s = t_buf.index(0)
    ds_s = t_buf.index(1)
    dk_t = gl.zeros([D, TK], gl.float32, s_layout)
    dv_t = gl.zeros([D, TK], gl.float32, s_layout)
    for i in range(n_blocks):
        q_s, do_s = _next_pair(q_desc, do_desc, q_buf, do_buf, bars, b, h, i, n_blocks)  # a CTA barrier first:
        rows = i * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))  # p_s, ds_s read by then
        lse = gl.load(lse_base + rows, mask=rows < N, other=float("inf"))
        delta = gl.load(delta_base + rows, mask=rows < N, other=0.0)
        s = warpgroup_mma(q_s, k_t, gl.zeros([BLOCK_M, TK], gl.float32, s_layout), use_acc=False, is_async=True)
        dp = warpgroup_mma(do_s, v_t, gl.zeros([BLOCK_M, TK], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
        p_s.store(p.to(p_s.dtype))
        ds_s.store((p * (dp - gl.expand_dims(delta, 1))).to(ds_s.dtype))
        fence_async_shared()
        _cta_barrier()  # every warp's P and dS, before the MMAs read them
        dv_t = warpgroup_mma(do_s.permute((1, 0)), p_s, dv_t, is_async=True)
        dk_t = warpgroup_mma(q_s.permute((1, 0)), ds_s, dk_t, is_async=True)
        dv_t, dk_t = warpgroup_mma_wait(num_outstanding=0, deps=(dv_t, dk_t))
    return dk_t, dv_t


@gluon.jit
def _dkdv_store(dk, dv, b, h, key0, N, dk_ptr, dv_ptr, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, cos_ptr, sin_ptr,
                stab_h, stab_n, P, scale, ROPE: gl.constexpr, num_warps: gl.constexpr):
    """dK, dV [R, D] fp32 of keys key0.. -> rows < N: dV as is, dK * scale rotated back (`_store_grad`)."""
    D: gl.constexpr = dk.shape[1]
    _store_rows(dv_ptr + b.to(gl.int64) * sdv_b + h.to(gl.int64) * sdv_h,
                gl.convert_layout(dv, _rot_layout(num_warps, D)), key0, N, sdv_n)
    _store_grad(dk_ptr + b.to(gl.int64) * sdk_b + h.to(gl.int64) * sdk_h, dk, key0, N, sdk_n, scale, cos_ptr, sin_ptr,
                h, stab_h, stab_n, P, ROPE, num_warps)


@gluon.jit
def _dkdv_program(k_s, v_s, bar_kv, q_desc, do_desc, q_buf, do_buf, bars, b, h, key0, n_blocks, lse_base, delta_base,
                  N, qk_scale, dk_ptr, dv_ptr, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, cos_ptr, sin_ptr, stab_h,
                  stab_n, P, scale, ROPE: gl.constexpr, TAIL_M: gl.constexpr, num_warps: gl.constexpr):
    """`gluon_dkdv_kernel`'s program as written: the keys as the MMA's rows (`_dkdv_step` per query block, the last
    one TAIL_M rows), then the stores; the ring's barriers released."""
    BLOCK_K: gl.constexpr = k_s.shape[0]
    BLOCK_M: gl.constexpr = q_buf.shape[2]
    D: gl.constexpr = k_s.shape[1]
    acc_layout: gl.constexpr = _mma_layout(num_warps, D)
    dk = gl.zeros([BLOCK_K, D], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_K, D], gl.float32, acc_layout)
    n_full = n_blocks - 1 if TAIL_M > 0 else n_blocks
    for i in range(n_full):
        q_s, do_s = _next_pair(q_desc, do_desc, q_buf, do_buf, bars, b, h, i, n_blocks)
        dk, dv = _dkdv_step(k_s, v_s, q_s, do_s, dk, dv, lse_base, delta_base, i * BLOCK_M, N, qk_scale, num_warps)
    if TAIL_M > 0:
        q_s, do_s = _next_pair(q_desc, do_desc, q_buf, do_buf, bars, b, h, n_full, n_blocks)
        dk, dv = _dkdv_step(k_s, v_s, q_s.slice(0, TAIL_M), do_s.slice(0, TAIL_M), dk, dv, lse_base, delta_base,
                            n_full * BLOCK_M, N, qk_scale, num_warps)
    _release(bar_kv, bars)
    _dkdv_store(dk, dv, b, h, key0, N, dk_ptr, dv_ptr, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, cos_ptr, sin_ptr,
                stab_h, stab_n, P, scale, ROPE, num_warps)


@gluon.jit
def gluon_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, sdk_b,
                      sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, stab_h, stab_n, H, N, P, n_kblocks, qk_scale, scale,
                      ROPE: gl.constexpr, STAGES: gl.constexpr, TAIL_M: gl.constexpr, SWAP_K: gl.constexpr):
    """dK, dV of BLOCK_K = 16 * num_warps keys of one head (program i: head i // n_kblocks, key block
    i % n_kblocks, so a head's blocks run side by side and share its Q and dO in L2). K and V (rotated K, from the
    forward) arrive once by TMA; the rotated Q and dO stream in BLOCK_M-row blocks through STAGES buffers, the
    next STAGES - 1 in flight. Per block, each warpgroup (64 keys) runs on the tensor cores
    S^T = K Q^T and dP^T = V dO^T, P^T = exp2(S^T * qk_scale - lse) (lse: base 2, from the forward),
    dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q, with P^T and dS^T as wgmma's register A operand
    (`_dkdv_step`). TAIL_M (0: none): the last block's N % BLOCK_M queries run as a block of only TAIL_M rows
    (577 = 9 * 64 + 1: 16 rows, not 64). SWAP_K (0: never): a program whose keys hold at most SWAP_K valid ones
    (a head's last block) runs them swapped (`_dkdv_swapped`). Epilogue: dK * scale rotated back by R^T (ROPE), dK
    and dV stored to rows < N."""
    BLOCK_K: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    num_warps: gl.constexpr = gl.num_warps()
    gl.static_assert(BLOCK_K == 16 * num_warps)
    gl.static_assert(STAGES >= 2)
    gl.static_assert(TAIL_M < BLOCK_M)
    gl.static_assert(SWAP_K == 0 or (SWAP_K % 16 == 0 and BLOCK_K == 64 and BLOCK_M == 64 and D == 64))
    pid = gl.program_id(0)
    bh = pid // n_kblocks
    key0 = (pid % n_kblocks) * BLOCK_K
    b = bh // H
    h = bh % H
    k_s, v_s, bar_kv, q_buf, do_buf, bars, n_blocks = _block_and_ring(k_desc, v_desc, q_desc, do_desc, b, h, key0, N,
                                                                       STAGES)
    lse_base = lse_ptr + bh.to(gl.int64) * N
    delta_base = delta_ptr + bh.to(gl.int64) * N
    mbarrier.wait(bar_kv, 0)
    if SWAP_K > 0:
        t_buf = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_M, SWAP_K], gl.NVMMASharedLayout(
            swizzle_byte_width=_swizzle(SWAP_K * 2), element_bitwidth=16, rank=2))
        if key0 + SWAP_K >= N:
            dk_t, dv_t = _dkdv_swapped(k_s, v_s, q_desc, do_desc, q_buf, do_buf, bars, t_buf, b, h, n_blocks,
                                       lse_base, delta_base, N, qk_scale, num_warps)
            _release(bar_kv, bars)
            _dkdv_store(gl.permute(dk_t, (1, 0)), gl.permute(dv_t, (1, 0)), b, h, key0, N, dk_ptr, dv_ptr, sdk_b,
                        sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, cos_ptr, sin_ptr, stab_h, stab_n, P, scale, ROPE, num_warps)
        else:
            _dkdv_program(k_s, v_s, bar_kv, q_desc, do_desc, q_buf, do_buf, bars, b, h, key0, n_blocks, lse_base,
                          delta_base, N, qk_scale, dk_ptr, dv_ptr, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, cos_ptr,
                          sin_ptr, stab_h, stab_n, P, scale, ROPE, TAIL_M, num_warps)
    else:
        _dkdv_program(k_s, v_s, bar_kv, q_desc, do_desc, q_buf, do_buf, bars, b, h, key0, n_blocks, lse_base,
                      delta_base, N, qk_scale, dk_ptr, dv_ptr, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, cos_ptr,
                      sin_ptr, stab_h, stab_n, P, scale, ROPE, TAIL_M, num_warps)


@gluon.jit
def _delta_rows(o_base, do_s, bar_do, delta_base, row0, N, so_n, num_warps: gl.constexpr):
    """delta = rowsum(o * dO) in fp32 of rows row0.. (the delta pass's sum) -> [R] (stored for rows < N, 0 past
    them); o from global memory, dO from shared memory once bar_do (its TMA load) has landed."""
    R: gl.constexpr = do_s.shape[0]
    D: gl.constexpr = do_s.shape[1]
    layout: gl.constexpr = _rot_layout(num_warps, D)
    rows = row0 + gl.arange(0, R, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    inside = rows < N
    o = gl.load(o_base + gl.expand_dims(rows.to(gl.int64) * so_n, 1) + gl.expand_dims(cols, 0),
                mask=gl.expand_dims(inside, 1), other=0.0)
    mbarrier.wait(bar_do, 0)
    delta = gl.sum(o.to(gl.float32) * do_s.load(layout).to(gl.float32), axis=1)
    gl.store(delta_base + rows, delta, mask=inside)
    return delta


@gluon.jit
def _dq_step(q_s, do_s, k_s, v_s, dq, lse, delta, qk_scale, num_warps: gl.constexpr):
    """One block of W = k_s.shape[0] keys against the program's queries: dq [BLOCK_Q, D] fp32 updated (waited
    for). lse, delta [BLOCK_Q] fp32. Keys past N are TMA's zeros: their dS multiplies a zero row of K."""
    W: gl.constexpr = k_s.shape[0]
    BLOCK_Q: gl.constexpr = q_s.shape[0]
    s_layout: gl.constexpr = _mma_layout(num_warps, W)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dq.type.layout, k_width=2)
    s = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([BLOCK_Q, W], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    dp = warpgroup_mma(do_s, v_s.permute((1, 0)), gl.zeros([BLOCK_Q, W], gl.float32, s_layout), use_acc=False,
                       is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
    p = gl.exp2(s * qk_scale - gl.expand_dims(gl.convert_layout(lse, gl.SliceLayout(1, s_layout)), 1))
    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
    ds = p * (dp - gl.expand_dims(gl.convert_layout(delta, gl.SliceLayout(1, s_layout)), 1))
    dq = warpgroup_mma(gl.convert_layout(ds.to(q_s.dtype), op_layout), k_s, dq, is_async=True)
    return warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))


@gluon.jit
def _dq_swapped(q_s, do_s, k_desc, v_desc, k_buf, v_buf, bars, t_buf, b, h, n_blocks, lse, delta, qk_scale,
                num_warps: gl.constexpr):
    """The program's queries when at most TQ = t_buf.shape[2] of them are valid (a head's last block), swapped: per
    key block S^T = K Q^T and dP^T = V dO^T with the 64 keys as the MMA's rows and the TQ queries as its columns,
    P^T = exp2(S^T * qk_scale - lse), dS^T = P^T (dP^T - delta), dQ^T += K^T dS^T (dS^T through t_buf [1,
    BLOCK_N, TQ] in shared memory) -> dq_t [D, TQ] fp32. lse, delta: [TQ] (`_lse_delta`). Every key block whole
    (keys past N: TMA's zero rows of K, so their dS^T adds nothing)."""
    TQ: gl.constexpr = t_buf.shape[2]
    BLOCK_N: gl.constexpr = k_buf.shape[2]
    D: gl.constexpr = k_buf.shape[4]
    s_layout: gl.constexpr = _mma_layout(num_warps, TQ)  # [BLOCK_N or D, TQ] tiles
    q_t = q_s.slice(0, TQ).permute((1, 0))  # [D, TQ]
    do_t = do_s.slice(0, TQ).permute((1, 0))
    ds_s = t_buf.index(0)
    lse = gl.convert_layout(lse, gl.SliceLayout(0, s_layout))
    delta = gl.convert_layout(delta, gl.SliceLayout(0, s_layout))
    dq_t = gl.zeros([D, TQ], gl.float32, s_layout)
    for i in range(n_blocks):
        k_s, v_s = _next_pair(k_desc, v_desc, k_buf, v_buf, bars, b, h, i, n_blocks)  # a CTA barrier first: ds_s
        st = warpgroup_mma(k_s, q_t, gl.zeros([BLOCK_N, TQ], gl.float32, s_layout), use_acc=False,  # read by then
                           is_async=True)
        dpt = warpgroup_mma(v_s, do_t, gl.zeros([BLOCK_N, TQ], gl.float32, s_layout), use_acc=False, is_async=True)
        st = warpgroup_mma_wait(num_outstanding=1, deps=(st, ))
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
        dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt, ))
        ds_s.store((pt * (dpt - gl.expand_dims(delta, 0))).to(ds_s.dtype))
        fence_async_shared()
        _cta_barrier()  # every warp's dS^T, before the MMA reads it
        dq_t = warpgroup_mma(k_s.permute((1, 0)), ds_s, dq_t, is_async=True)
        dq_t = warpgroup_mma_wait(num_outstanding=0, deps=(dq_t, ))
    return dq_t


@gluon.jit
def _lse_delta(o_ptr, lse_ptr, delta_ptr, do_s, bar_q, b, h, bh, q0, N, so_b, so_h, so_n, layout: gl.constexpr,
               DELTA: gl.constexpr, num_warps: gl.constexpr):
    """lse, delta [R = do_s.shape[0]] fp32 of queries q0.. in `layout` (rows past N: lse +inf, so P = 0): delta
    computed from o and dO and stored for the dK/dV kernel (DELTA), else read (the delta pass's). Returns once Q and
    dO (bar_q) have landed."""
    rows = q0 + gl.arange(0, do_s.shape[0], layout=layout)
    lse = gl.load(lse_ptr + bh.to(gl.int64) * N + rows, mask=rows < N, other=float("inf"))
    if DELTA:
        delta = _delta_rows(o_ptr + b.to(gl.int64) * so_b + h.to(gl.int64) * so_h, do_s, bar_q,
                            delta_ptr + bh.to(gl.int64) * N, q0, N, so_n, num_warps)
        delta = gl.convert_layout(delta, layout)
    else:
        delta = gl.load(delta_ptr + bh.to(gl.int64) * N + rows, mask=rows < N, other=0.0)
        mbarrier.wait(bar_q, 0)
    return lse, delta


@gluon.jit
def _dq_program(q_s, do_s, bar_q, k_desc, v_desc, k_buf, v_buf, bars, b, h, bh, q0, n_blocks, N, o_ptr, lse_ptr,
                delta_ptr, so_b, so_h, so_n, dq_ptr, sdq_b, sdq_h, sdq_n, cos_ptr, sin_ptr, stab_h, stab_n, P, qk_scale,
                scale, ROPE: gl.constexpr, TAIL_N: gl.constexpr, DELTA: gl.constexpr, num_warps: gl.constexpr):
    """`gluon_dq_kernel`'s program as written: the queries as the MMA's rows (`_dq_step` per key block, the last one
    TAIL_N keys), then the store; the ring's barriers released."""
    BLOCK_Q: gl.constexpr = q_s.shape[0]
    D: gl.constexpr = q_s.shape[1]
    acc_layout: gl.constexpr = _mma_layout(num_warps, D)
    lse, delta = _lse_delta(o_ptr, lse_ptr, delta_ptr, do_s, bar_q, b, h, bh, q0, N, so_b, so_h, so_n,
                            gl.SliceLayout(1, acc_layout), DELTA, num_warps)
    dq = gl.zeros([BLOCK_Q, D], gl.float32, acc_layout)
    n_full = n_blocks - 1 if TAIL_N > 0 else n_blocks
    for i in range(n_full):
        k_s, v_s = _next_pair(k_desc, v_desc, k_buf, v_buf, bars, b, h, i, n_blocks)
        dq = _dq_step(q_s, do_s, k_s, v_s, dq, lse, delta, qk_scale, num_warps)
    if TAIL_N > 0:
        k_s, v_s = _next_pair(k_desc, v_desc, k_buf, v_buf, bars, b, h, n_full, n_blocks)
        dq = _dq_step(q_s, do_s, k_s.slice(0, TAIL_N), v_s.slice(0, TAIL_N), dq, lse, delta, qk_scale, num_warps)
    _release(bar_q, bars)
    _store_grad(dq_ptr + b.to(gl.int64) * sdq_b + h.to(gl.int64) * sdq_h, dq, q0, N, sdq_n, scale, cos_ptr, sin_ptr,
                h, stab_h, stab_n, P, ROPE, num_warps)


@gluon.jit
def gluon_dq_kernel(q_desc, k_desc, v_desc, do_desc, o_ptr, lse_ptr, delta_ptr, dq_ptr, cos_ptr, sin_ptr, so_b,
                    so_h, so_n, sdq_b, sdq_h, sdq_n, stab_h, stab_n, H, N, P, n_qblocks, qk_scale, scale,
                    ROPE: gl.constexpr, STAGES: gl.constexpr, TAIL_N: gl.constexpr, DELTA: gl.constexpr,
                    SWAP_Q: gl.constexpr):
    """dQ of BLOCK_Q = 16 * num_warps queries of one head (program i: head i // n_qblocks, query block
    i % n_qblocks): the mirror of `gluon_dkdv_kernel`. The rotated Q and dO arrive once by TMA; the rotated K and V
    stream in BLOCK_N-row blocks through STAGES buffers. Per block S = Q K^T, dP = dO V^T,
    P = exp2(S * qk_scale - lse), dS = P (dP - delta), dQ += dS K (`_dq_step`); the last block of TAIL_N keys
    (0: a whole one). DELTA: delta = rowsum(o * dO) of its rows computed here (o: [B, H, N, D] at o_ptr, channels
    dense) and stored for the dK/dV kernel, which then runs after it; else read (the delta pass's). SWAP_Q (0:
    never): a program whose queries hold at most SWAP_Q valid ones (a head's last block) runs them swapped
    (`_dq_swapped`). Epilogue: dQ * scale rotated back by R^T (ROPE), stored to rows < N."""
    BLOCK_Q: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    num_warps: gl.constexpr = gl.num_warps()
    gl.static_assert(BLOCK_Q == 16 * num_warps)
    gl.static_assert(STAGES >= 2)
    gl.static_assert(TAIL_N < BLOCK_N)
    gl.static_assert(SWAP_Q == 0 or (SWAP_Q % 16 == 0 and BLOCK_Q == 64 and BLOCK_N == 64 and D == 64))
    pid = gl.program_id(0)
    bh = pid // n_qblocks
    q0 = (pid % n_qblocks) * BLOCK_Q
    b = bh // H
    h = bh % H
    q_s, do_s, bar_q, k_buf, v_buf, bars, n_blocks = _block_and_ring(q_desc, do_desc, k_desc, v_desc, b, h, q0, N,
                                                                      STAGES)
    if SWAP_Q > 0:
        t_buf = gl.allocate_shared_memory(q_desc.dtype, [1, BLOCK_N, SWAP_Q], gl.NVMMASharedLayout(
            swizzle_byte_width=_swizzle(SWAP_Q * 2), element_bitwidth=16, rank=2))
        if q0 + SWAP_Q >= N:
            lse, delta = _lse_delta(o_ptr, lse_ptr, delta_ptr, do_s.slice(0, SWAP_Q), bar_q, b, h, bh, q0, N, so_b,
                                    so_h, so_n, gl.SliceLayout(1, _rot_layout(num_warps, D)), DELTA, num_warps)
            dq_t = _dq_swapped(q_s, do_s, k_desc, v_desc, k_buf, v_buf, bars, t_buf, b, h, n_blocks, lse, delta,
                               qk_scale, num_warps)
            _release(bar_q, bars)
            _store_grad(dq_ptr + b.to(gl.int64) * sdq_b + h.to(gl.int64) * sdq_h, gl.permute(dq_t, (1, 0)), q0, N,
                        sdq_n, scale, cos_ptr, sin_ptr, h, stab_h, stab_n, P, ROPE, num_warps)
        else:
            _dq_program(q_s, do_s, bar_q, k_desc, v_desc, k_buf, v_buf, bars, b, h, bh, q0, n_blocks, N, o_ptr,
                        lse_ptr, delta_ptr, so_b, so_h, so_n, dq_ptr, sdq_b, sdq_h, sdq_n, cos_ptr, sin_ptr, stab_h,
                        stab_n, P, qk_scale, scale, ROPE, TAIL_N, DELTA, num_warps)
    else:
        _dq_program(q_s, do_s, bar_q, k_desc, v_desc, k_buf, v_buf, bars, b, h, bh, q0, n_blocks, N, o_ptr, lse_ptr,
                    delta_ptr, so_b, so_h, so_n, dq_ptr, sdq_b, sdq_h, sdq_n, cos_ptr, sin_ptr, stab_h, stab_n, P,
                    qk_scale, scale, ROPE, TAIL_N, DELTA, num_warps)
