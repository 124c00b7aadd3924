"""The Gluon (`triton.experimental.gluon`) kernels of triton_fa_rope on Hopper: the forwards, which `gluon_fwd`
plans and launches, and the split backward's dK/dV and dQ, which `gluon_bwd` does (what they compute, which calls
take them and why: those modules' docstrings).

    resident_fwd_kernel  N <= 256: per head, TMA loads Q, K and V whole while the previous head computes; each
                         warpgroup owns 64-row slices of the queries.
    long_fwd_kernel      256 < N <= 640, warp-specialized: a producer warpgroup loads K and V whole (boxes of 64
                         rows) and the queries in 128-row slices through two buffers, and rotates each as it lands;
                         the kernel's two warpgroups attend, the key loop software-pipelined in each (FA3's
                         intra-warpgroup overlap); mbarriers hand the buffers over, so RoPE runs beside the tensor
                         cores.

    gluon_dkdv_kernel    N > 256: 64 keys per warpgroup resident, the rotated Q and dO streamed through a TMA ring
    gluon_dq_kernel      its mirror: 64 queries per warpgroup resident, K and V streamed

Read top-down: layouts, RoPE on shared memory, the scores / softmax / P V steps and the resident kernel, the long
kernel's slice loop, its warp-specialized partitions and the kernel, then the backward's ring, steps and kernels. Written against Triton 3.6; names that 3.7+
renamed are aliased below.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# Triton 3.6 names, and what later versions call them
_tma_load = getattr(tma, "async_copy_global_to_shared", None) or tma.async_load
_tma_store = getattr(tma, "async_copy_shared_to_global", None) or tma.async_store
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

BLOCK_N = 64  # keys per online-softmax step (and rows per K/V box of the long kernel)
_BLOCK_N = gl.constexpr(BLOCK_N)

# ---------------------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------------------


@gluon.constexpr_function
def _mma_layout(num_warps, n):
    """wgmma accumulator layout of a [rows, n] tile: warpgroup w owns rows 64w..64w+63 of every 16 * num_warps."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def _rot_layout(num_warps, D):
    """[rows, D] tile for the rotation: 8 consecutive channels (4 pairs, 16 bytes) per thread."""
    return gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def _pair_layout(num_warps, D):
    """[rows, D/2] table tile matching `_rot_layout` after the pair split."""
    return gl.BlockedLayout([1, 4], [32 // (D // 8), D // 8], [num_warps, 1], [1, 0])


# ---------------------------------------------------------------------------------------------------------------
# RoPE on shared memory, in place
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def _load_table(cos_base, sin_base, row0, N, P, stab_n, ROWS: gl.constexpr, D: gl.constexpr,
                num_warps: gl.constexpr):
    """cos, sin [ROWS, D/2] fp32 of tokens row0.. (table row n - P; prefix tokens and rows >= N: cos 1, sin 0)."""
    layout: gl.constexpr = _pair_layout(num_warps, D)
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, D // 2, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims((rows - P) * stab_n, 1) + gl.expand_dims(cols, 0)  # int32: a table is small
    mask = gl.expand_dims((rows >= P) & (rows < N), 1)
    cos = gl.load(cos_base + offs, mask=mask, other=1.0).to(gl.float32)  # fp16 or fp32 tables (`_tables`)
    return cos, gl.load(sin_base + offs, mask=mask, other=0.0).to(gl.float32)


@gluon.jit
def _rope_inplace(x_smem, c, s, mult, num_warps: gl.constexpr):
    """x_smem [R, D] <- rope(x) * mult, in fp32, rounded to x_smem's dtype. Each thread writes the addresses it read
    (the pair swap happens in its registers), so no barrier is needed between the load and the store."""
    R: gl.constexpr = x_smem.shape[0]
    D: gl.constexpr = x_smem.shape[1]
    layout: gl.constexpr = _rot_layout(num_warps, D)
    even, odd = gl.split(gl.reshape(x_smem.load(layout).to(gl.float32), [R, D // 2, 2]))
    c = gl.convert_layout(c, even.type.layout)
    s = gl.convert_layout(s, even.type.layout)
    y = gl.reshape(gl.join((even * c - odd * s) * mult, (odd * c + even * s) * mult), [R, D])
    x_smem.store(gl.convert_layout(y, layout).to(x_smem.dtype))


# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def _issue_scores(q_smem, k_chunk, num_warps: gl.constexpr):
    """S = Q K^T of one key chunk, issued asynchronously (wait for it with `warpgroup_mma_wait`)."""
    M: gl.constexpr = q_smem.shape[0]
    CH: gl.constexpr = k_chunk.shape[0]
    return warpgroup_mma(q_smem, k_chunk.permute((1, 0)), gl.zeros([M, CH], gl.float32, _mma_layout(num_warps, CH)),
                         use_acc=False, is_async=True)


@gluon.jit
def _softmax_step(s, m_i, l_i, key0, N, sm_scale, MASK: gl.constexpr):
    """s [M, CH] fp32 scores of keys key0..: the online-softmax update -> p (unnormalised weights), alpha (acc's
    factor), m_i, l_i (in m_i's layout)."""
    s_layout: gl.constexpr = s.type.layout
    s = s * sm_scale
    if MASK:  # keys past N (zeros from TMA) get no weight
        cols = key0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < N, 0), s, -float("inf"))
    m_new = gl.maximum(m_i, gl.convert_layout(gl.max(s, axis=1), m_i.type.layout))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - gl.expand_dims(gl.convert_layout(m_new, gl.SliceLayout(1, s_layout)), 1))
    l_i = l_i * alpha + gl.convert_layout(gl.sum(p, axis=1), m_i.type.layout)
    return p, alpha, m_new, l_i


@gluon.jit
def _pv(p, v_chunk, acc):
    """acc += P V, issued asynchronously; P from registers as wgmma's A operand."""
    p_op = gl.convert_layout(p.to(v_chunk.dtype), gl.DotOperandLayout(operand_index=0, parent=acc.type.layout,
                                                                      k_width=2))
    return warpgroup_mma(p_op, v_chunk, acc, is_async=True)


@gluon.jit
def _attend_chunk(q_smem, k_chunk, v_chunk, acc, m_i, l_i, key0, N, sm_scale, MASK: gl.constexpr,
                  num_warps: gl.constexpr):
    """Keys [key0, key0 + CH): S = Q K^T (log2 units after sm_scale), online softmax, acc += P V, each waited for.
    k_chunk, v_chunk: [CH, D] shared views; acc [M, D] fp32; m_i, l_i in acc's row layout."""
    s = warpgroup_mma_wait(num_outstanding=0, deps=(_issue_scores(q_smem, k_chunk, num_warps), ))
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, key0, N, sm_scale, MASK)
    acc = _pv(p, v_chunk, acc * gl.expand_dims(alpha, 1))
    return warpgroup_mma_wait(num_outstanding=0, deps=(acc, )), m_i, l_i


@gluon.jit
def _issue_loads(q_desc, k_desc, v_desc, q_dst, k_dst, v_dst, bar_qk, bar_v, tile, H, pred):
    """TMA: Q and K of head `tile` (-> bar_qk), V (-> bar_v, so V still lands while K and Q rotate)."""
    b = tile // H
    h = tile % H
    mbarrier.expect(bar_qk, q_desc.block_type.nbytes + k_desc.block_type.nbytes, pred=pred)
    _tma_load(q_desc, [b, 0, h, 0], bar_qk, q_dst, pred=pred)
    _tma_load(k_desc, [b, 0, h, 0], bar_qk, k_dst, pred=pred)
    mbarrier.expect(bar_v, v_desc.block_type.nbytes, pred=pred)
    _tma_load(v_desc, [b, 0, h, 0], bar_v, v_dst, pred=pred)


@gluon.jit
def _head(q_s4, k_s4, v_s4, bar_qk, bar_v, phase, o_desc, qr_desc, kr_desc, lse_ptr, cos_ptr, sin_ptr, tile, t0,
          stab_h, stab_n, H, N, P, qk_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr,
          ROPE: gl.constexpr, SAVE_ROT: gl.constexpr, ROT_ROWS: gl.constexpr, ROT_CHUNKS: gl.constexpr,
          num_warps: gl.constexpr):
    """Attention of head `tile` = b * H + h, whose loads were issued on bar_qk (Q, K) and bar_v (V). t0: a zero
    the compiler cannot see through; table offsets without it are hoisted out of the persistent loop and held in
    registers, which spills (sm_90 compile, N = 197). SAVE_ROT (training, with ROPE): Q is rotated without the
    scale, and the rotated Q and K leave by TMA to qr_desc, kr_desc for the backward."""
    BLOCK: gl.constexpr = q_s4.shape[1]
    D: gl.constexpr = q_s4.shape[3]
    q_s = q_s4.reshape([BLOCK, D])
    k_s = k_s4.reshape([BLOCK, D])
    v_s = v_s4.reshape([BLOCK, D])
    h = tile % H
    if ROPE:
        cos_base = cos_ptr + h.to(gl.int64) * stab_h
        sin_base = sin_ptr + h.to(gl.int64) * stab_h
        # q and k rows are the same tokens: one table load for both; the next chunk's load in flight while one
        # rotates; rows past the last chunk (>= N) are TMA's zeros, left as they are
        c, s = _load_table(cos_base, sin_base, t0, N, P, stab_n, ROT_ROWS, D, num_warps)  # overlaps the TMA
        mbarrier.wait(bar_qk, phase=phase)
        for i in gl.static_range(ROT_CHUNKS):
            if i + 1 < ROT_CHUNKS:
                c_next, s_next = _load_table(cos_base, sin_base, t0 + (i + 1) * ROT_ROWS, N, P, stab_n, ROT_ROWS,
                                             D, num_warps)
            _rope_inplace(k_s.slice(i * ROT_ROWS, ROT_ROWS), c, s, 1.0, num_warps)
            _rope_inplace(q_s.slice(i * ROT_ROWS, ROT_ROWS), c, s, 1.0 if SAVE_ROT else qk_scale, num_warps)
            if i + 1 < ROT_CHUNKS:
                c = c_next
                s = s_next
        fence_async_shared()  # the stores above, before wgmma (and TMA) read them
        _cta_barrier()  # every warpgroup reads all of K
        if SAVE_ROT:  # rows >= N clipped; waited for before q_s takes o
            _tma_store(qr_desc, [tile // H, 0, h, 0], q_s4)
            _tma_store(kr_desc, [tile // H, 0, h, 0], k_s4)
            sm_scale = qk_scale
        else:
            sm_scale = 1.0
    else:
        mbarrier.wait(bar_qk, phase=phase)
        sm_scale = qk_scale

    o_layout: gl.constexpr = _mma_layout(num_warps, D)
    acc = gl.zeros([BLOCK, D], gl.float32, o_layout)
    m_i = gl.full([BLOCK], -float("inf"), gl.float32, gl.SliceLayout(1, o_layout))
    l_i = gl.full([BLOCK], 0.0, gl.float32, gl.SliceLayout(1, o_layout))
    mbarrier.wait(bar_v, phase=phase)
    for j in gl.static_range(N_FULL):
        acc, m_i, l_i = _attend_chunk(q_s, k_s.slice(j * _BLOCK_N, _BLOCK_N), v_s.slice(j * _BLOCK_N, _BLOCK_N),
                                      acc, m_i, l_i, j * _BLOCK_N, N, sm_scale, False, num_warps)
    if MID_N > 0:
        acc, m_i, l_i = _attend_chunk(q_s, k_s.slice(N_FULL * _BLOCK_N, MID_N), v_s.slice(N_FULL * _BLOCK_N, MID_N),
                                      acc, m_i, l_i, N_FULL * _BLOCK_N, N, sm_scale, False, num_warps)
    if TAIL_N > 0:
        key0: gl.constexpr = N_FULL * _BLOCK_N + MID_N
        acc, m_i, l_i = _attend_chunk(q_s, k_s.slice(key0, TAIL_N), v_s.slice(key0, TAIL_N), acc, m_i, l_i, key0,
                                      N, sm_scale, True, num_warps)

    # epilogue: lse in log2 units (as the Triton kernels store it); o through q's buffer, by TMA (rows >= N clipped)
    rows = gl.arange(0, BLOCK, layout=m_i.type.layout)
    gl.store(lse_ptr + tile.to(gl.int64) * N + rows, m_i + gl.log2(l_i), mask=rows < N)
    if SAVE_ROT:
        tma.store_wait(0)  # the rotated Q has left q_s
    _cta_barrier()  # every warpgroup's wgmma is done with q_s before it is overwritten
    q_s.store((acc / gl.expand_dims(l_i, 1)).to(q_s.dtype))
    fence_async_shared()
    _cta_barrier()
    _tma_store(o_desc, [tile // H, 0, h, 0], q_s4)
    tma.store_wait(0)


@gluon.jit
def resident_fwd_kernel(q_desc, k_desc, v_desc, o_desc, qr_desc, kr_desc, lse_ptr, cos_ptr, sin_ptr, stab_h, stab_n,
                        H, N, P, n_heads, qk_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr,
                        ROPE: gl.constexpr, SAVE_ROT: gl.constexpr, ROT_ROWS: gl.constexpr,
                        ROT_CHUNKS: gl.constexpr):
    """Persistent: program i takes heads i, i + grid, ... (n_heads = B * H), with the next head's TMA loads in
    flight (two buffers) while one computes. Keys: N_FULL unmasked chunks of BLOCK_N, one unmasked chunk of MID_N
    (0: none), one masked chunk of TAIL_N (0: none); descriptors' blocks [1, BLOCK, 1, D], BLOCK = pow2 >= N.
    SAVE_ROT: the rotated q and k are written to qr_desc, kr_desc too (`_head`)."""
    BLOCK: gl.constexpr = q_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    num_warps: gl.constexpr = gl.num_warps()
    gl.static_assert(N_FULL * _BLOCK_N + MID_N + TAIL_N <= BLOCK)
    gl.static_assert(ROT_ROWS * ROT_CHUNKS <= BLOCK)
    gl.static_assert(BLOCK % (16 * num_warps) == 0)
    q_buf = gl.allocate_shared_memory(q_desc.dtype, [2, 1, BLOCK, 1, D], q_desc.layout)
    k_buf = gl.allocate_shared_memory(k_desc.dtype, [2, 1, BLOCK, 1, D], k_desc.layout)
    v_buf = gl.allocate_shared_memory(v_desc.dtype, [2, 1, BLOCK, 1, D], v_desc.layout)
    bars_qk = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    bars_v = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(bars_qk.index(i), count=1)
        mbarrier.init(bars_v.index(i), count=1)
    fence_async_shared()
    _cta_barrier()

    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    _issue_loads(q_desc, k_desc, v_desc, q_buf.index(0), k_buf.index(0), v_buf.index(0), bars_qk.index(0),
                 bars_v.index(0), pid, H, True)
    it = 0
    for tile in range(pid, n_heads, nprog):
        slot = it % 2
        nxt = tile + nprog  # into the other buffer, whose head finished in the previous iteration
        _issue_loads(q_desc, k_desc, v_desc, q_buf.index(1 - slot), k_buf.index(1 - slot), v_buf.index(1 - slot),
                     bars_qk.index(1 - slot), bars_v.index(1 - slot), nxt, H, nxt < n_heads)
        _head(q_buf.index(slot), k_buf.index(slot), v_buf.index(slot), bars_qk.index(slot), bars_v.index(slot),
              (it // 2) & 1, o_desc, qr_desc, kr_desc, lse_ptr, cos_ptr, sin_ptr, tile, tile // n_heads, stab_h,
              stab_n, H, N, P, qk_scale, N_FULL, MID_N, TAIL_N, ROPE, SAVE_ROT, ROT_ROWS, ROT_CHUNKS, num_warps)
        it += 1
    for i in gl.static_range(2):
        mbarrier.invalidate(bars_qk.index(i))
        mbarrier.invalidate(bars_v.index(i))


# ---------------------------------------------------------------------------------------------------------------
# Longer sequences (256 < N <= 640): K and V resident, queries in slices
# ---------------------------------------------------------------------------------------------------------------


@gluon.constexpr_function
def _chunk_key0(c, n_full, mid_n):
    """First key of chunk c of `chunking`'s split (n_full chunks of BLOCK_N, then MID_N, then the tail)."""
    return c * BLOCK_N if c <= n_full else n_full * BLOCK_N + mid_n


@gluon.constexpr_function
def _chunk_width(c, n_full, mid_n, tail_n):
    if c < n_full:
        return BLOCK_N
    return mid_n if c == n_full and mid_n > 0 else tail_n


@gluon.jit
def _chunk_kv(k_buf, v_buf, key0: gl.constexpr, width: gl.constexpr):
    """K and V rows [key0, key0 + width) as [width, D] shared views (a chunk never crosses a BLOCK_N-row box)."""
    CH: gl.constexpr = k_buf.shape[2]
    D: gl.constexpr = k_buf.shape[4]
    k = k_buf.index(key0 // CH).reshape([CH, D]).slice(key0 % CH, width)
    v = v_buf.index(key0 // CH).reshape([CH, D]).slice(key0 % CH, width)
    return k, v


@gluon.jit
def _await_box(bars, box, phase, WAIT: gl.constexpr):
    """Wait for K/V box `box` of this head (in `long_fwd_kernel`'s first slice of a head); nothing if not WAIT."""
    if WAIT:
        mbarrier.wait(bars.index(box), phase)


@gluon.jit
def _attend_slice(q_s, k_buf, v_buf, N, sm_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr,
                  num_warps: gl.constexpr, k_ready=None, v_ready=None, phase=0, WAIT: gl.constexpr = False):
    """One query slice q_s [M, D] over all keys -> acc [M, D] fp32 (unnormalised), m_i, l_i. Software-pipelined in
    each warpgroup (FA3's intra-warpgroup overlap): chunk c + 1's S = Q K^T runs on the tensor cores during chunk
    c's softmax, chunk c's P V during chunk c + 1's. The full chunks in a loop (unrolled, ten chunks spilled
    registers at N = 577), then the half-width and the masked one. WAIT: before each box's first use, wait on
    k_ready / v_ready[box] at `phase`: the boxes of a head still arriving."""
    M: gl.constexpr = q_s.shape[0]
    D: gl.constexpr = q_s.shape[1]
    CH: gl.constexpr = k_buf.shape[2]
    NCH: gl.constexpr = N_FULL + (1 if MID_N > 0 else 0) + (1 if TAIL_N > 0 else 0)
    o_layout: gl.constexpr = _mma_layout(num_warps, D)
    acc = gl.zeros([M, D], gl.float32, o_layout)
    m_i = gl.full([M], -float("inf"), gl.float32, gl.SliceLayout(1, o_layout))
    l_i = gl.full([M], 0.0, gl.float32, gl.SliceLayout(1, o_layout))
    gl.static_assert(N_FULL >= 2)
    _await_box(k_ready, 0, phase, WAIT)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(_issue_scores(q_s, k_buf.index(0).reshape([CH, D]),
                                                                  num_warps), ))
    # chunk 0 before the loop, so that acc enters it as what the loop carries: an asynchronous accumulator
    _await_box(k_ready, 1, phase, WAIT)
    s_next = _issue_scores(q_s, k_buf.index(1).reshape([CH, D]), num_warps)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, N, sm_scale, False)
    _await_box(v_ready, 0, phase, WAIT)
    acc = _pv(p, v_buf.index(0).reshape([CH, D]), acc)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next, ))
    for j in range(1, N_FULL - 1):  # chunk j + 1 is a full one too
        _await_box(k_ready, j + 1, phase, WAIT)
        s_next = _issue_scores(q_s, k_buf.index(j + 1).reshape([CH, D]), num_warps)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j * CH, N, sm_scale, False)
        # the previous chunk's P V was issued before s_next: waiting down to one leaves s_next in flight
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        _await_box(v_ready, j, phase, WAIT)
        acc = _pv(p, v_buf.index(j).reshape([CH, D]), acc * gl.expand_dims(alpha, 1))
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next, ))
    for c in gl.static_range(N_FULL - 1, NCH):  # the last full chunk (its scores in s), the narrower ones
        if c + 1 < NCH:
            k_n, v_n = _chunk_kv(k_buf, v_buf, _chunk_key0(c + 1, N_FULL, MID_N),
                                 _chunk_width(c + 1, N_FULL, MID_N, TAIL_N))
            _await_box(k_ready, _chunk_key0(c + 1, N_FULL, MID_N) // CH, phase, WAIT)
            s_next = _issue_scores(q_s, k_n, num_warps)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, _chunk_key0(c, N_FULL, MID_N), N, sm_scale,
                                           c == NCH - 1 and TAIL_N > 0)
        if c + 1 < NCH:
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        k_c, v_c = _chunk_kv(k_buf, v_buf, _chunk_key0(c, N_FULL, MID_N), _chunk_width(c, N_FULL, MID_N, TAIL_N))
        _await_box(v_ready, _chunk_key0(c, N_FULL, MID_N) // CH, phase, WAIT)
        acc = _pv(p, v_c, acc * gl.expand_dims(alpha, 1))
        if c + 1 < NCH:
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next, ))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    return acc, m_i, l_i


# ---------------------------------------------------------------------------------------------------------------
# Longer sequences, warp-specialized: a producer warpgroup loads and rotates, two warpgroups attend
# ---------------------------------------------------------------------------------------------------------------

_WS_PRODUCER_WARPS = gl.constexpr(4)
_WS_PRODUCER_REGS = gl.constexpr(120)  # 64-row rotation steps, the next step's table in flight: no spills at 120
# 12 warps: 65,536 registers / 384 threads; the attending warps get (168 * 12 - 120 * 4) / 8 = 192
WS_MAXNREG = 168


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, qr_desc, kr_desc, q_buf, k_buf, v_buf, bars, cos_ptr, sin_ptr, stab_h,
                 stab_n, H, N, P, n_heads, qk_scale, NS: gl.constexpr, NKC: gl.constexpr, ROPE: gl.constexpr,
                 SAVE_ROT: gl.constexpr):
    """Per head: each query slice into a free buffer by TMA, rotated in place (scale * log2 e folded in) ->
    q_ready; after the head's first slice, once the heads before are done with them (kv_empty), K and V by TMA in
    boxes (V straight to v_ready), each K box rotated as it lands -> k_ready. So the next head's first slice is
    ready while the last one of the head before is attended, and the attending warps start on K box 0 while the
    rest still arrive. SAVE_ROT: slices rotated without the scale, each rotated slice and K box also stored by TMA
    to qr_desc, kr_desc (waited for before its buffer is loaded again)."""
    q_loaded, q_ready, q_empty, k_loaded, k_ready, v_ready, kv_empty = bars
    SLICE_: gl.constexpr = q_desc.block_type.shape[1]
    CH: gl.constexpr = k_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    num_warps: gl.constexpr = gl.num_warps()
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    it = 0
    for tile in range(pid, n_heads, nprog):
        b = tile // H
        h = tile % H
        t0 = tile // n_heads  # 0, opaque to the compiler (see `_head`)
        cos_base = cos_ptr + h.to(gl.int64) * stab_h
        sin_base = sin_ptr + h.to(gl.int64) * stab_h
        for si in range(NS):
            g = it * NS + si
            buf = g % 2
            mbarrier.wait(q_empty.index(buf), ((g // 2) & 1) ^ 1)  # a fresh barrier passes phase 1
            if SAVE_ROT:  # the stores from this buffer have read it (long done: the slice was attended since)
                tma.store_wait(0)
            mbarrier.expect(q_loaded.index(buf), q_desc.block_type.nbytes)
            _tma_load(q_desc, [b, si * SLICE_, h, 0], q_loaded.index(buf), q_buf.index(buf))
            if ROPE:  # in BLOCK_N-row steps: 32 values and 32 table entries per thread
                for r in gl.static_range(SLICE_ // CH):
                    c, s = _load_table(cos_base, sin_base, t0 + si * SLICE_ + r * CH, N, P, stab_n, CH, D,
                                       num_warps)
                    mbarrier.wait(q_loaded.index(buf), (g // 2) & 1)
                    _rope_inplace(q_buf.index(buf).reshape([SLICE_, D]).slice(r * CH, CH), c, s,
                                  1.0 if SAVE_ROT else qk_scale, num_warps)
            else:
                mbarrier.wait(q_loaded.index(buf), (g // 2) & 1)
            fence_async_shared()
            _cta_barrier()  # this warpgroup's stores, before one thread arrives for all
            mbarrier.arrive(q_ready.index(buf), count=1)
            if SAVE_ROT:
                _tma_store(qr_desc, [b, si * SLICE_, h, 0], q_buf.index(buf))
            if si == 0:
                if ROPE:  # box 0's table while the heads before finish with K and V
                    c, s = _load_table(cos_base, sin_base, t0, N, P, stab_n, CH, D, num_warps)
                mbarrier.wait(kv_empty, (it & 1) ^ 1)
                if SAVE_ROT:  # the K boxes' stores too, before the boxes are loaded again
                    tma.store_wait(0)
                for j in gl.static_range(NKC):  # in the order the first slice uses them
                    mbarrier.expect(k_loaded.index(j), k_desc.block_type.nbytes)
                    _tma_load(k_desc, [b, j * CH, h, 0], k_loaded.index(j), k_buf.index(j))
                    mbarrier.expect(v_ready.index(j), v_desc.block_type.nbytes)
                    _tma_load(v_desc, [b, j * CH, h, 0], v_ready.index(j), v_buf.index(j))
                for j in range(NKC):  # a dynamic loop: unrolled, all ten boxes' table loads are hoisted and spill
                    if ROPE:  # the next box's table in flight while this one rotates
                        c_next, s_next = _load_table(cos_base, sin_base, t0 + (j + 1) * CH, N, P, stab_n, CH, D,
                                                     num_warps)
                        mbarrier.wait(k_loaded.index(j), it & 1)
                        _rope_inplace(k_buf.index(j).reshape([CH, D]), c, s, 1.0, num_warps)
                        fence_async_shared()
                        _cta_barrier()
                        if SAVE_ROT:
                            _tma_store(kr_desc, [b, j * CH, h, 0], k_buf.index(j))
                        c = c_next
                        s = s_next
                    else:
                        mbarrier.wait(k_loaded.index(j), it & 1)
                    mbarrier.arrive(k_ready.index(j), count=1)
        it += 1
    if SAVE_ROT:
        tma.store_wait(0)


@gluon.jit
def _ws_attend(q_buf, k_buf, v_buf, o_buf, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS: gl.constexpr,
               N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr, num_warps: gl.constexpr):
    """The attending warpgroups: each ready query slice over all keys (`_attend_slice`, waiting on the boxes in a
    head's first slice), its buffer released (and after a head's last slice, K and V), o by TMA through o_buf."""
    q_loaded, q_ready, q_empty, k_loaded, k_ready, v_ready, kv_empty = bars
    SLICE_: gl.constexpr = q_buf.shape[2]
    D: gl.constexpr = q_buf.shape[4]
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    o_s = o_buf.reshape([SLICE_, D])
    it = 0
    for tile in range(pid, n_heads, nprog):
        h = tile % H
        for si in range(NS):
            g = it * NS + si
            buf = g % 2
            q_s = q_buf.index(buf).reshape([SLICE_, D])
            mbarrier.wait(q_ready.index(buf), (g // 2) & 1)
            if si == 0:  # K and V may still be arriving
                acc, m_i, l_i = _attend_slice(q_s, k_buf, v_buf, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps,
                                              k_ready, v_ready, it & 1, True)
            else:  # without the waits, whose shared-memory fences would join the warpgroups at every chunk
                acc, m_i, l_i = _attend_slice(q_s, k_buf, v_buf, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps)
            tma.store_wait(0)  # the slice before's o has left o_buf
            _cta_barrier()  # both warpgroups are done with q_s (after a head's last slice: with K and V)
            mbarrier.arrive(q_empty.index(buf), count=1)
            mbarrier.arrive(kv_empty, count=1, pred=si == NS - 1)

            # epilogue: lse (log2 units); o by TMA (rows >= N clipped)
            rows = si * SLICE_ + gl.arange(0, SLICE_, layout=m_i.type.layout)
            gl.store(lse_ptr + tile.to(gl.int64) * N + rows, m_i + gl.log2(l_i), mask=rows < N)
            o_s.store((acc / gl.expand_dims(l_i, 1)).to(o_s.dtype))
            fence_async_shared()
            _cta_barrier()
            _tma_store(o_desc, [tile // H, si * SLICE_, h, 0], o_buf)
        it += 1
    tma.store_wait(0)


@gluon.jit
def long_fwd_kernel(q_desc, k_desc, v_desc, o_desc, qr_desc, kr_desc, lse_ptr, cos_ptr, sin_ptr, stab_h, stab_n, H,
                    N, P, n_heads, qk_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr,
                    ROPE: gl.constexpr, SAVE_ROT: gl.constexpr, ROT_ROWS: gl.constexpr, ROT_CHUNKS: gl.constexpr):
    """Persistent: program i takes heads i, i + grid, ... (n_heads = B * H). Per head, K and V arrive by TMA in
    boxes of BLOCK_N rows (rows past N as zeros), the queries in SLICE-row slices through two buffers. A producer
    warpgroup issues the loads and rotates each slice and K box in place (`_ws_producer`); the kernel's num_warps
    attend (`_ws_attend`); mbarriers hand each buffer over. ROT_CHUNKS: query slices per head (ROT_ROWS = SLICE
    rows each). SAVE_ROT: the producer writes the rotated q and k to qr_desc, kr_desc too."""
    SLICE_: gl.constexpr = q_desc.block_type.shape[1]
    CH: gl.constexpr = k_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    NS: gl.constexpr = ROT_CHUNKS
    NKC: gl.constexpr = N_FULL + (1 if MID_N + TAIL_N > 0 else 0)  # K/V boxes
    num_warps: gl.constexpr = gl.num_warps()
    gl.static_assert(ROT_ROWS == SLICE_ and CH == _BLOCK_N and SLICE_ == 16 * num_warps)
    gl.static_assert(MID_N + TAIL_N <= CH)
    q_buf = gl.allocate_shared_memory(q_desc.dtype, [2, 1, SLICE_, 1, D], q_desc.layout)
    o_buf = gl.allocate_shared_memory(o_desc.dtype, [1, SLICE_, 1, D], o_desc.layout)
    k_buf = gl.allocate_shared_memory(k_desc.dtype, [NKC, 1, CH, 1, D], k_desc.layout)
    v_buf = gl.allocate_shared_memory(v_desc.dtype, [NKC, 1, CH, 1, D], v_desc.layout)
    q_loaded = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_loaded = gl.allocate_shared_memory(gl.int64, [NKC, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NKC, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NKC, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_loaded.index(i), count=1)
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    for j in gl.static_range(NKC):
        mbarrier.init(k_loaded.index(j), count=1)
        mbarrier.init(k_ready.index(j), count=1)
        mbarrier.init(v_ready.index(j), count=1)
    mbarrier.init(kv_empty, count=1)
    fence_async_shared()
    _cta_barrier()

    bars = (q_loaded, q_ready, q_empty, k_loaded, k_ready, v_ready, kv_empty)
    if ROPE and not SAVE_ROT:
        sm_scale = 1.0  # folded into q
    else:
        sm_scale = qk_scale
    gl.warp_specialize([
        (_ws_attend, (q_buf, k_buf, v_buf, o_buf, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS, N_FULL, MID_N,
                      TAIL_N, num_warps)),
        (_ws_producer, (q_desc, k_desc, v_desc, qr_desc, kr_desc, q_buf, k_buf, v_buf, bars, cos_ptr, sin_ptr,
                        stab_h, stab_n, H, N, P, n_heads, qk_scale, NS, NKC, ROPE, SAVE_ROT)),
    ], [_WS_PRODUCER_WARPS], [_WS_PRODUCER_REGS])
    for i in gl.static_range(2):
        mbarrier.invalidate(q_loaded.index(i))
        mbarrier.invalidate(q_ready.index(i))
        mbarrier.invalidate(q_empty.index(i))
    for j in gl.static_range(NKC):
        mbarrier.invalidate(k_loaded.index(j))
        mbarrier.invalidate(k_ready.index(j))
        mbarrier.invalidate(v_ready.index(j))
    mbarrier.invalidate(kv_empty)


# ---------------------------------------------------------------------------------------------------------------
# The backward's dK and dV (N > 256): a block of K and V resident, the queries and dO streamed through a ring
# ---------------------------------------------------------------------------------------------------------------


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
def gluon_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, sdk_b,
                      sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, stab_h, stab_n, H, N, P, n_kblocks, qk_scale, scale,
                      ROPE: gl.constexpr, STAGES: gl.constexpr, TAIL_M: gl.constexpr):
    """dK, dV of BLOCK_K = 16 * num_warps keys of one head (program i: head i // n_kblocks, key block
    i % n_kblocks, so a head's blocks run side by side and share its Q and dO in L2). K and V (rotated K, from the
    forward) arrive once by TMA; the rotated Q and dO stream in BLOCK_M-row blocks through STAGES buffers, the
    next STAGES - 1 in flight. Per block, each warpgroup (64 keys) runs on the tensor cores
    S^T = K Q^T and dP^T = V dO^T, P^T = exp2(S^T * qk_scale - lse) (lse: base 2, from the forward),
    dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q, with P^T and dS^T as wgmma's register A operand
    (`_dkdv_step`). TAIL_M (0: none): the last block's N % BLOCK_M queries run as a block of only TAIL_M rows
    (577 = 9 * 64 + 1: 16 rows, not 64). Epilogue: dK * scale rotated back by R^T (ROPE), dK and dV stored to
    rows < N."""
    BLOCK_K: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    num_warps: gl.constexpr = gl.num_warps()
    gl.static_assert(BLOCK_K == 16 * num_warps)
    gl.static_assert(STAGES >= 2)
    gl.static_assert(TAIL_M < BLOCK_M)
    pid = gl.program_id(0)
    bh = pid // n_kblocks
    key0 = (pid % n_kblocks) * BLOCK_K
    b = bh // H
    h = bh % H
    k_s, v_s, bar_kv, q_buf, do_buf, bars, n_blocks = _block_and_ring(k_desc, v_desc, q_desc, do_desc, b, h, key0, N,
                                                                       STAGES)
    acc_layout: gl.constexpr = _mma_layout(num_warps, D)
    dk = gl.zeros([BLOCK_K, D], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_K, D], gl.float32, acc_layout)
    lse_base = lse_ptr + bh.to(gl.int64) * N
    delta_base = delta_ptr + bh.to(gl.int64) * N
    mbarrier.wait(bar_kv, 0)
    n_full = n_blocks - 1 if TAIL_M > 0 else n_blocks
    for i in range(n_full):
        q_s, do_s = _next_pair(q_desc, do_desc, q_buf, do_buf, bars, b, h, i, n_blocks)
        dk, dv = _dkdv_step(k_s, v_s, q_s, do_s, dk, dv, lse_base, delta_base, i * BLOCK_M, N, qk_scale, num_warps)
    if TAIL_M > 0:
        q_s, do_s = _next_pair(q_desc, do_desc, q_buf, do_buf, bars, b, h, n_full, n_blocks)
        dk, dv = _dkdv_step(k_s, v_s, q_s.slice(0, TAIL_M), do_s.slice(0, TAIL_M), dk, dv, lse_base, delta_base,
                            n_full * BLOCK_M, N, qk_scale, num_warps)
    _release(bar_kv, bars)

    _store_rows(dv_ptr + b.to(gl.int64) * sdv_b + h.to(gl.int64) * sdv_h,
                gl.convert_layout(dv, _rot_layout(num_warps, D)), key0, N, sdv_n)
    _store_grad(dk_ptr + b.to(gl.int64) * sdk_b + h.to(gl.int64) * sdk_h, dk, key0, N, sdk_n, scale, cos_ptr, sin_ptr,
                h, stab_h, stab_n, P, ROPE, num_warps)


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
def gluon_dq_kernel(q_desc, k_desc, v_desc, do_desc, lse_ptr, delta_ptr, dq_ptr, cos_ptr, sin_ptr, sdq_b, sdq_h,
                    sdq_n, stab_h, stab_n, H, N, P, n_qblocks, qk_scale, scale, ROPE: gl.constexpr,
                    STAGES: gl.constexpr, TAIL_N: gl.constexpr):
    """dQ of BLOCK_Q = 16 * num_warps queries of one head (program i: head i // n_qblocks, query block
    i % n_qblocks): the mirror of `gluon_dkdv_kernel`. The rotated Q and dO arrive once by TMA; the rotated K and V
    stream in BLOCK_N-row blocks through STAGES buffers. Per block S = Q K^T, dP = dO V^T,
    P = exp2(S * qk_scale - lse), dS = P (dP - delta), dQ += dS K (`_dq_step`); the last block of TAIL_N keys
    (0: a whole one). Epilogue: dQ * scale rotated back by R^T (ROPE), stored to rows < N."""
    BLOCK_Q: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    num_warps: gl.constexpr = gl.num_warps()
    gl.static_assert(BLOCK_Q == 16 * num_warps)
    gl.static_assert(STAGES >= 2)
    gl.static_assert(TAIL_N < BLOCK_N)
    pid = gl.program_id(0)
    bh = pid // n_qblocks
    q0 = (pid % n_qblocks) * BLOCK_Q
    b = bh // H
    h = bh % H
    q_s, do_s, bar_q, k_buf, v_buf, bars, n_blocks = _block_and_ring(q_desc, do_desc, k_desc, v_desc, b, h, q0, N,
                                                                      STAGES)
    acc_layout: gl.constexpr = _mma_layout(num_warps, D)
    rows = q0 + gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(1, acc_layout))
    lse = gl.load(lse_ptr + bh.to(gl.int64) * N + rows, mask=rows < N, other=float("inf"))  # rows past N: P = 0
    delta = gl.load(delta_ptr + bh.to(gl.int64) * N + rows, mask=rows < N, other=0.0)
    dq = gl.zeros([BLOCK_Q, D], gl.float32, acc_layout)
    mbarrier.wait(bar_q, 0)
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
