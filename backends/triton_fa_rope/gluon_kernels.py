"""The Gluon (`triton.experimental.gluon`) kernels of triton_fa_rope's Hopper forwards up to 256 tokens, and what
every Gluon forward shares; `gluon_fwd` plans and launches them (what they compute, which calls take them and why:
its docstring). The longer sequences' kernels are in `gluon_long_kernels` (256 < N <= 640, K and V resident) and
`gluon_stream_kernels` (past 640 tokens, V through a ring), the backward's in `gluon_bwd_kernels`; all of them use
this module's layouts, table load and key-chunk steps.

    resident_fwd_kernel  N <= 256: per head, TMA loads Q, K and V whole while the previous head computes; each
                         warpgroup owns 64-row slices of the queries.
    resident_ws_fwd_kernel  the same, warp-specialized: a warpgroup loads and rotates the next head while the
                         others attend this one.

Read top-down: layouts, RoPE on shared memory, the scores / softmax / P V steps, the resident kernel, its
warp-specialized form. Written against Triton 3.6; names that 3.7+ renamed are aliased below.
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

BLOCK_N = 64  # keys per online-softmax step (and rows per K/V box of the longer sequences' kernels)
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
def _swizzle(row_bytes):
    """The widest NVMMA swizzle (32, 64 or 128 bytes) a row of `row_bytes` takes."""
    return min(128, row_bytes)


@gluon.constexpr_function
def _pair_layout(num_warps, D):
    """[rows, D/2] table tile matching `_rot_layout` after the pair split."""
    return gl.BlockedLayout([1, 4], [32 // (D // 8), D // 8], [num_warps, 1], [1, 0])


@gluon.jit
def _mbarriers(n: gl.constexpr, count: gl.constexpr):
    """n mbarriers in shared memory ([n, 1]), each initialised to `count` arrivals a phase."""
    bars = gl.allocate_shared_memory(gl.int64, [n, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(n):
        mbarrier.init(bars.index(i), count=count)
    return bars


@gluon.jit
def _invalidate(bars):
    """`_mbarriers`' barriers, invalidated (at the kernel's end)."""
    n: gl.constexpr = bars.shape[0]
    for i in gl.static_range(n):
        mbarrier.invalidate(bars.index(i))


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
def _softmax_init(M: gl.constexpr, D: gl.constexpr, num_warps: gl.constexpr):
    """The online softmax's start for M query rows: acc [M, D] fp32 zeros in wgmma's accumulator layout, m_i = -inf
    and l_i = 0 in its row layout."""
    o_layout: gl.constexpr = _mma_layout(num_warps, D)
    rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    return (gl.zeros([M, D], gl.float32, o_layout), gl.full([M], -float("inf"), gl.float32, rows),
            gl.full([M], 0.0, gl.float32, rows))


@gluon.jit
def _softmax_step(s, m_i, l_i, key0, N, sm_scale, MASK: gl.constexpr):
    """s [M, CH] fp32 scores of keys key0.. before sm_scale (scale * log2 e, or 1.0 where q carries it): the
    online-softmax update in log2 units -> p (unnormalised weights), alpha (acc's factor), m_i, l_i (in m_i's
    layout). In a chunk without masked keys the scale enters p as one fused multiply-add per score, s * sm_scale - m,
    and the row max as the raw scores' max (min, for a negative scale) times sm_scale: a multiply per score less where
    the scale is not folded into q. A masked chunk is scaled first, so that its -inf is the least for either sign."""
    s_layout: gl.constexpr = s.type.layout
    scale = sm_scale
    if MASK:  # keys past N (zeros from TMA) get no weight
        cols = key0 + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < N, 0), s * sm_scale, -float("inf"))
        scale = 1.0
        m_raw = gl.max(s, axis=1)
    elif sm_scale >= 0:
        m_raw = gl.max(s, axis=1)
    else:
        m_raw = gl.min(s, axis=1)
    m_new = gl.maximum(m_i, gl.convert_layout(m_raw, m_i.type.layout) * scale)
    p = gl.exp2(s * scale - gl.expand_dims(gl.convert_layout(m_new, gl.SliceLayout(1, s_layout)), 1))
    alpha = gl.exp2(m_i - m_new)
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
def _attend_keys(q_s, k_s, v_s, acc, m_i, l_i, N, sm_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr,
                 TAIL_N: gl.constexpr, num_warps: gl.constexpr):
    """A resident head's keys (q_s, k_s, v_s [BLOCK, D] shared): N_FULL unmasked chunks of BLOCK_N, one unmasked
    chunk of MID_N (0: none), one masked chunk of TAIL_N (0: none), each `_attend_chunk`."""
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
    return acc, m_i, l_i


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
def _rotate_qk(q_s, k_s, bar_qk, phase, cos_base, sin_base, t0, N, P, stab_n, q_mult, ROT_ROWS: gl.constexpr,
               ROT_CHUNKS: gl.constexpr, num_warps: gl.constexpr):
    """K and Q (times q_mult) of a head [BLOCK, D] rotated in place in ROT_CHUNKS steps of ROT_ROWS rows once their
    loads on bar_qk have landed. q and k rows are the same tokens: one table load for both; the next step's load in
    flight while one rotates; rows past the last step (>= N) are TMA's zeros, left as they are."""
    D: gl.constexpr = q_s.shape[1]
    c, s = _load_table(cos_base, sin_base, t0, N, P, stab_n, ROT_ROWS, D, num_warps)  # overlaps the TMA
    mbarrier.wait(bar_qk, phase=phase)
    for i in gl.static_range(ROT_CHUNKS):
        if i + 1 < ROT_CHUNKS:
            c_next, s_next = _load_table(cos_base, sin_base, t0 + (i + 1) * ROT_ROWS, N, P, stab_n, ROT_ROWS,
                                         D, num_warps)
        _rope_inplace(k_s.slice(i * ROT_ROWS, ROT_ROWS), c, s, 1.0, num_warps)
        _rope_inplace(q_s.slice(i * ROT_ROWS, ROT_ROWS), c, s, q_mult, num_warps)
        if i + 1 < ROT_CHUNKS:
            c = c_next
            s = s_next


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
        _rotate_qk(q_s, k_s, bar_qk, phase, cos_ptr + h.to(gl.int64) * stab_h, sin_ptr + h.to(gl.int64) * stab_h, t0,
                   N, P, stab_n, 1.0 if SAVE_ROT else qk_scale, ROT_ROWS, ROT_CHUNKS, num_warps)
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

    acc, m_i, l_i = _softmax_init(BLOCK, D, num_warps)
    mbarrier.wait(bar_v, phase=phase)
    acc, m_i, l_i = _attend_keys(q_s, k_s, v_s, acc, m_i, l_i, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps)

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
def _head_slots(q_desc, k_desc, v_desc, N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr,
                ROT_ROWS: gl.constexpr, ROT_CHUNKS: gl.constexpr):
    """The resident kernels' two slots of a head's Q, K and V ([2, 1, BLOCK, 1, D] each, as the descriptors' blocks),
    once the key chunks and rotation steps are checked to fit BLOCK rows and the warps to tile them."""
    BLOCK: gl.constexpr = q_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    gl.static_assert(N_FULL * _BLOCK_N + MID_N + TAIL_N <= BLOCK)
    gl.static_assert(ROT_ROWS * ROT_CHUNKS <= BLOCK)
    gl.static_assert(BLOCK % (16 * gl.num_warps()) == 0)
    return (gl.allocate_shared_memory(q_desc.dtype, [2, 1, BLOCK, 1, D], q_desc.layout),
            gl.allocate_shared_memory(k_desc.dtype, [2, 1, BLOCK, 1, D], k_desc.layout),
            gl.allocate_shared_memory(v_desc.dtype, [2, 1, BLOCK, 1, D], v_desc.layout))


@gluon.jit
def resident_fwd_kernel(q_desc, k_desc, v_desc, o_desc, qr_desc, kr_desc, lse_ptr, cos_ptr, sin_ptr, stab_h, stab_n,
                        H, N, P, n_heads, qk_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr,
                        ROPE: gl.constexpr, SAVE_ROT: gl.constexpr, ROT_ROWS: gl.constexpr,
                        ROT_CHUNKS: gl.constexpr):
    """Persistent: program i takes heads i, i + grid, ... (n_heads = B * H), with the next head's TMA loads in
    flight (two buffers) while one computes. Keys: N_FULL unmasked chunks of BLOCK_N, one unmasked chunk of MID_N
    (0: none), one masked chunk of TAIL_N (0: none); descriptors' blocks [1, BLOCK, 1, D], BLOCK = pow2 >= N.
    SAVE_ROT: the rotated q and k are written to qr_desc, kr_desc too (`_head`)."""
    num_warps: gl.constexpr = gl.num_warps()
    q_buf, k_buf, v_buf = _head_slots(q_desc, k_desc, v_desc, N_FULL, MID_N, TAIL_N, ROT_ROWS, ROT_CHUNKS)
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
# The warp-specialized resident kernel
# ---------------------------------------------------------------------------------------------------------------

_WS_ROTATE_WARPS = gl.constexpr(4)
# 12 warps: the launch's cap (65,536 / 384 threads = 170, in steps of 8); the attending warps get (168 * 12 - 160 *
# 4) / 8 = 172, of which ptxas takes 168 (offline sm_90, Triton 3.6: 4 bytes spilled; the rotating warpgroup
# spilled at 120-152 registers, the attending warps at 152)
WS_MAXNREG = 168
_WS_ROTATE_REGS = gl.constexpr(160)
WS_ROT_ROWS = 32  # the rotating warpgroup's step: 16 values and 16 table entries per thread


@gluon.jit
def _ws_rotate_heads(q_desc, k_desc, v_desc, qr_desc, kr_desc, q_buf, k_buf, v_buf, bars, cos_ptr, sin_ptr, stab_h,
                     stab_n, H, N, P, n_heads, qk_scale, ROPE: gl.constexpr, SAVE_ROT: gl.constexpr,
                     ROT_ROWS: gl.constexpr, ROT_CHUNKS: gl.constexpr):
    """The loading and rotating warpgroup: per head, once the attending warps are done with its slot (slot_free),
    Q, K and V by TMA into it, K and Q rotated in place (`_rotate_qk`; scale * log2 e folded into Q but for
    SAVE_ROT) -> qk_ready; SAVE_ROT: the rotated Q and K also stored by TMA (waited for before the slot loads
    again). So head i + 1 lands and rotates while head i is attended."""
    qk_loaded, v_ready, qk_ready, slot_free = bars
    BLOCK: gl.constexpr = q_buf.shape[2]
    D: gl.constexpr = q_buf.shape[4]
    num_warps: gl.constexpr = gl.num_warps()
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    it = 0
    for tile in range(pid, n_heads, nprog):
        slot = it % 2
        phase = (it // 2) & 1
        b = tile // H
        h = tile % H
        mbarrier.wait(slot_free.index(slot), phase ^ 1)  # a fresh barrier passes phase 1
        if SAVE_ROT:  # the slot's rotated q and k of two heads before have left it
            tma.store_wait(0)
        _issue_loads(q_desc, k_desc, v_desc, q_buf.index(slot), k_buf.index(slot), v_buf.index(slot),
                     qk_loaded.index(slot), v_ready.index(slot), tile, H, True)
        if ROPE:
            q_s = q_buf.index(slot).reshape([BLOCK, D])
            k_s = k_buf.index(slot).reshape([BLOCK, D])
            _rotate_qk(q_s, k_s, qk_loaded.index(slot), phase, cos_ptr + h.to(gl.int64) * stab_h,
                       sin_ptr + h.to(gl.int64) * stab_h, tile // n_heads, N, P, stab_n,
                       1.0 if SAVE_ROT else qk_scale, ROT_ROWS, ROT_CHUNKS, num_warps)
            fence_async_shared()
            _cta_barrier()  # this warpgroup's stores, before one thread arrives for all (and the TMA stores read)
            if SAVE_ROT:  # rows >= N clipped
                _tma_store(qr_desc, [b, 0, h, 0], q_buf.index(slot))
                _tma_store(kr_desc, [b, 0, h, 0], k_buf.index(slot))
        else:
            mbarrier.wait(qk_loaded.index(slot), phase)
        mbarrier.arrive(qk_ready.index(slot), count=1)
        it += 1
    if SAVE_ROT:
        tma.store_wait(0)


@gluon.jit
def _ws_attend_heads(q_buf, k_buf, v_buf, o_buf, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale,
                     N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr, num_warps: gl.constexpr):
    """The attending warps: per head, once its Q and K are rotated (qk_ready) and V has landed, the key chunks as
    `_head` runs them; the slot handed back (slot_free) before the epilogue, o by TMA through o_buf."""
    _, v_ready, qk_ready, slot_free = bars
    BLOCK: gl.constexpr = q_buf.shape[2]
    D: gl.constexpr = q_buf.shape[4]
    o_s = o_buf.reshape([BLOCK, D])
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    it = 0
    for tile in range(pid, n_heads, nprog):
        slot = it % 2
        phase = (it // 2) & 1
        q_s = q_buf.index(slot).reshape([BLOCK, D])
        k_s = k_buf.index(slot).reshape([BLOCK, D])
        v_s = v_buf.index(slot).reshape([BLOCK, D])
        acc, m_i, l_i = _softmax_init(BLOCK, D, num_warps)
        mbarrier.wait(qk_ready.index(slot), phase)
        mbarrier.wait(v_ready.index(slot), phase)
        acc, m_i, l_i = _attend_keys(q_s, k_s, v_s, acc, m_i, l_i, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps)
        _cta_barrier()  # every attending warp is done with the slot
        mbarrier.arrive(slot_free.index(slot), count=1)

        # epilogue: lse in log2 units; o by TMA (rows >= N clipped) through o_buf, once the head before's o left it
        rows = gl.arange(0, BLOCK, layout=m_i.type.layout)
        gl.store(lse_ptr + tile.to(gl.int64) * N + rows, m_i + gl.log2(l_i), mask=rows < N)
        tma.store_wait(0)
        _cta_barrier()
        o_s.store((acc / gl.expand_dims(l_i, 1)).to(o_s.dtype))
        fence_async_shared()
        _cta_barrier()
        _tma_store(o_desc, [tile // H, 0, tile % H, 0], o_buf)
        it += 1
    tma.store_wait(0)


@gluon.jit
def resident_ws_fwd_kernel(q_desc, k_desc, v_desc, o_desc, qr_desc, kr_desc, lse_ptr, cos_ptr, sin_ptr, stab_h,
                           stab_n, H, N, P, n_heads, qk_scale, s_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr,
                           TAIL_N: gl.constexpr, ROPE: gl.constexpr, SAVE_ROT: gl.constexpr, ROT_ROWS: gl.constexpr,
                           ROT_CHUNKS: gl.constexpr):
    """`resident_fwd_kernel`'s work warp-specialized: a warpgroup loads each head into one of two slots and rotates
    its K and Q there (`_ws_rotate_heads`) while the kernel's num_warps attend the head in the other slot
    (`_ws_attend_heads`), so RoPE runs beside the tensor cores; o leaves through a buffer of its own. Four mbarriers
    per slot hand it over: Q and K landed, V landed, Q and K rotated, slot free. Its arguments are
    `resident_fwd_kernel`'s and s_scale, the scale S takes (1.0 where q carries it): as a constant the attending
    warps spilled 356 bytes (sm_90 compile)."""
    BLOCK: gl.constexpr = q_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    num_warps: gl.constexpr = gl.num_warps()
    q_buf, k_buf, v_buf = _head_slots(q_desc, k_desc, v_desc, N_FULL, MID_N, TAIL_N, ROT_ROWS, ROT_CHUNKS)
    o_buf = gl.allocate_shared_memory(o_desc.dtype, [1, BLOCK, 1, D], o_desc.layout)
    qk_loaded = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    qk_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    slot_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(qk_loaded.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(qk_ready.index(i), count=1)
        mbarrier.init(slot_free.index(i), count=1)
    fence_async_shared()
    _cta_barrier()

    bars = (qk_loaded, v_ready, qk_ready, slot_free)
    gl.warp_specialize([
        (_ws_attend_heads, (q_buf, k_buf, v_buf, o_buf, bars, o_desc, lse_ptr, H, N, n_heads, s_scale, N_FULL,
                            MID_N, TAIL_N, num_warps)),
        (_ws_rotate_heads, (q_desc, k_desc, v_desc, qr_desc, kr_desc, q_buf, k_buf, v_buf, bars, cos_ptr, sin_ptr,
                            stab_h, stab_n, H, N, P, n_heads, qk_scale, ROPE, SAVE_ROT, ROT_ROWS, ROT_CHUNKS)),
    ], [_WS_ROTATE_WARPS], [_WS_ROTATE_REGS])
    for i in gl.static_range(2):
        mbarrier.invalidate(qk_loaded.index(i))
        mbarrier.invalidate(v_ready.index(i))
        mbarrier.invalidate(qk_ready.index(i))
        mbarrier.invalidate(slot_free.index(i))
