"""The long Gluon forward of triton_fa_rope's Hopper forwards (`gluon_fwd` plans and launches it): 256 < N <= 640,
K and V of a head resident in shared memory in 64-row boxes, the queries in slices.

    long_fwd_kernel      warp-specialized: a producer warpgroup loads K and V whole (boxes of 64 rows) and the
                         queries in 128-row slices through two buffers, and rotates each as it lands; the kernel's
                         two warpgroups attend, the key loop software-pipelined in each (FA3's intra-warpgroup
                         overlap); mbarriers hand the buffers over, so RoPE runs beside the tensor cores.
                         ATTEND_GROUPS = 3: three attending warpgroups as partitions of their own, 64-row slices in
                         turn, K/V boxes handed back box by box (`_ws_attend_group`).

Read top-down: the slice loop over resident boxes (pipelined, serial, swapped), the warp-specialized partitions and
the kernel. Layouts, RoPE and the key-chunk steps are `gluon_kernels`'.
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

from attnhub.backends.triton_fa_rope.gluon_kernels import (
    _BLOCK_N,
    BLOCK_N,
    _attend_chunk,
    _cta_barrier,
    _issue_scores,
    _load_table,
    _mma_layout,
    _pv,
    _rope_inplace,
    _softmax_init,
    _softmax_step,
    _swizzle,
    _tma_load,
    _tma_store,
)


# ---------------------------------------------------------------------------------------------------------------
# One query slice over K and V resident in boxes
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
def _release_box(kv_free, box, RELEASE: gl.constexpr):
    """In a head's last slice (RELEASE): both warpgroups have waited for their P V of K/V box `box` -> kv_free[box],
    so the producer loads the next head's box while this slice goes on; nothing if not RELEASE."""
    if RELEASE:
        _cta_barrier()  # one thread arrives for both warpgroups
        mbarrier.arrive(kv_free.index(box), count=1)


@gluon.jit
def _attend_slice(q_s, k_buf, v_buf, N, sm_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr,
                  num_warps: gl.constexpr, k_ready=None, v_ready=None, phase=0, WAIT: gl.constexpr = False,
                  kv_free=None, RELEASE: gl.constexpr = False):
    """One query slice q_s [M, D] over all keys -> acc [M, D] fp32 (unnormalised), m_i, l_i. Software-pipelined in
    each warpgroup (FA3's intra-warpgroup overlap): chunk c + 1's S = Q K^T runs on the tensor cores during chunk
    c's softmax, chunk c's P V during chunk c + 1's. The full chunks in a loop (unrolled, ten chunks spilled
    registers at N = 577), then the half-width and the masked one. WAIT: before each box's first use, wait on
    k_ready / v_ready[box] at `phase`: the boxes of a head still arriving. RELEASE (a head's last slice, with
    early release): each box to kv_free as soon as its last chunk's P V is done (`_release_box`)."""
    M: gl.constexpr = q_s.shape[0]
    D: gl.constexpr = q_s.shape[1]
    CH: gl.constexpr = k_buf.shape[2]
    NCH: gl.constexpr = N_FULL + (1 if MID_N > 0 else 0) + (1 if TAIL_N > 0 else 0)
    acc, m_i, l_i = _softmax_init(M, D, num_warps)
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
        _release_box(kv_free, j - 1, RELEASE)  # chunk j - 1's P V is done
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
        if _chunk_key0(c - 1, N_FULL, MID_N) // CH != _chunk_key0(c, N_FULL, MID_N) // CH:  # chunk c - 1's box done
            _release_box(kv_free, _chunk_key0(c - 1, N_FULL, MID_N) // CH, RELEASE)
        k_c, v_c = _chunk_kv(k_buf, v_buf, _chunk_key0(c, N_FULL, MID_N), _chunk_width(c, N_FULL, MID_N, TAIL_N))
        _await_box(v_ready, _chunk_key0(c, N_FULL, MID_N) // CH, phase, WAIT)
        acc = _pv(p, v_c, acc * gl.expand_dims(alpha, 1))
        if c + 1 < NCH:
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next, ))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    _release_box(kv_free, _chunk_key0(NCH - 1, N_FULL, MID_N) // CH, RELEASE)
    return acc, m_i, l_i


@gluon.jit
def _attend_slice_serial(q_s, k_buf, v_buf, N, sm_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr,
                         TAIL_N: gl.constexpr, num_warps: gl.constexpr, k_ready=None, v_ready=None, phase=0,
                         WAIT: gl.constexpr = False, kv_free=None, RELEASE: gl.constexpr = False):
    """`_attend_slice` with each chunk's S, softmax and P V in turn (no chunk's S in flight during the softmax
    before it: about 32 registers fewer per thread), the full chunks in a loop, then the last box's half-width and
    masked chunks; the same WAIT and RELEASE per box."""
    M: gl.constexpr = q_s.shape[0]
    D: gl.constexpr = q_s.shape[1]
    CH: gl.constexpr = k_buf.shape[2]
    acc, m_i, l_i = _softmax_init(M, D, num_warps)
    for j in range(N_FULL):
        _await_box(k_ready, j, phase, WAIT)
        _await_box(v_ready, j, phase, WAIT)
        acc, m_i, l_i = _attend_chunk(q_s, k_buf.index(j).reshape([CH, D]), v_buf.index(j).reshape([CH, D]), acc,
                                      m_i, l_i, j * CH, N, sm_scale, False, num_warps)
        _release_box(kv_free, j, RELEASE)
    if MID_N + TAIL_N > 0:
        _await_box(k_ready, N_FULL, phase, WAIT)
        _await_box(v_ready, N_FULL, phase, WAIT)
        if MID_N > 0:
            k_c, v_c = _chunk_kv(k_buf, v_buf, N_FULL * CH, MID_N)
            acc, m_i, l_i = _attend_chunk(q_s, k_c, v_c, acc, m_i, l_i, N_FULL * CH, N, sm_scale, False, num_warps)
        if TAIL_N > 0:
            k_c, v_c = _chunk_kv(k_buf, v_buf, N_FULL * CH + MID_N, TAIL_N)
            acc, m_i, l_i = _attend_chunk(q_s, k_c, v_c, acc, m_i, l_i, N_FULL * CH + MID_N, N, sm_scale, True,
                                          num_warps)
        _release_box(kv_free, N_FULL, RELEASE)
    return acc, m_i, l_i


@gluon.jit
def _attend_tail(q_s, k_buf, v_buf, pt_s, N, sm_scale, NKC: gl.constexpr, k_ready, v_ready, phase, kv_free=None,
                 RELEASE: gl.constexpr = False, num_warps: gl.constexpr = 4):
    """A last query slice of at most TQ = pt_s.shape[1] rows (577 = 9 * 64 + 1), swapped: S^T = K Q^T with the 64
    keys of a box as the MMA's rows and the TQ queries as its columns, online softmax down the keys, O^T += V^T P^T
    (P^T through pt_s [64, TQ] in shared memory) -> o_t [D, TQ] fp32 (unnormalised), m_i, l_i [TQ]: a 64 x TQ MMA
    per box instead of 64 x 64 for one valid row. Boxes whole (the last masked), each waited for (a head's boxes are
    ready or arriving, either is safe to wait on); RELEASE: each box to kv_free after its P V."""
    TQ: gl.constexpr = pt_s.shape[1]
    D: gl.constexpr = q_s.shape[1]
    CH: gl.constexpr = k_buf.shape[2]
    s_layout: gl.constexpr = _mma_layout(num_warps, TQ)  # [CH or D, TQ] accumulators
    q_t = q_s.slice(0, TQ).permute((1, 0))  # [D, TQ]
    o_t = gl.zeros([D, TQ], gl.float32, s_layout)
    m_i = gl.full([TQ], -float("inf"), gl.float32, gl.SliceLayout(0, s_layout))
    l_i = gl.full([TQ], 0.0, gl.float32, gl.SliceLayout(0, s_layout))
    for j in range(NKC):
        k_j = k_buf.index(j).reshape([CH, D])
        v_j = v_buf.index(j).reshape([CH, D])
        _await_box(k_ready, j, phase, True)
        s = warpgroup_mma(k_j, q_t, gl.zeros([CH, TQ], gl.float32, s_layout), use_acc=False) * sm_scale
        keys = j * CH + gl.arange(0, CH, layout=gl.SliceLayout(1, s_layout))
        s = gl.where(gl.expand_dims(keys < N, 1), s, -float("inf"))  # rows past N: TMA's zeros, no weight
        m_new = gl.maximum(m_i, gl.max(s, axis=0))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 0))
        l_i = l_i * alpha + gl.sum(p, axis=0)
        m_i = m_new
        pt_s.store(p.to(pt_s.dtype))
        fence_async_shared()
        _cta_barrier()  # every warp's P^T, before the MMA reads it
        _await_box(v_ready, j, phase, True)
        o_t = warpgroup_mma(v_j.permute((1, 0)), pt_s, o_t * gl.expand_dims(alpha, 0))
        _cta_barrier()  # the MMA has read pt_s before the next box's P^T overwrites it
        _release_box(kv_free, j, RELEASE)
    return o_t, m_i, l_i


# ---------------------------------------------------------------------------------------------------------------
# Longer sequences, warp-specialized: a producer warpgroup loads and rotates, two warpgroups attend
# ---------------------------------------------------------------------------------------------------------------

_WS_PRODUCER_WARPS = gl.constexpr(4)
_WS_PRODUCER_REGS = gl.constexpr(120)  # 64-row rotation steps, the next step's table in flight: no spills at 120
# 12 warps: 65,536 registers / 384 threads; the attending warps get (168 * 12 - 120 * 4) / 8 = 192
WS_MAXNREG = 168
# ATTEND_GROUPS = 3 (16 warps): the launch's register cap (65,536 / 512 threads), the attending worker groups' and
# the producer's registers; the default partition (group 0) gets what is left, (128 * 16 - 2 * 120 * 4 - 144 * 4) /
# 4 = 128. Offline sm_90 (Triton 3.6): three groups fit 120 with the unpipelined key loop only, and their producer
# spilled at 120.
WS_3_GROUPS_MAXNREG = 128
_WS_3_GROUP_REGS = gl.constexpr(120)
_WS_3_PRODUCER_REGS = gl.constexpr(144)


@gluon.jit
def _load_box(k_desc, v_desc, k_buf, v_buf, k_loaded, v_ready, kv_free, b, h, j, it):
    """K/V box j of head (b, h), the program's it-th, by TMA once the head before is done with the box (kv_free[j];
    early release)."""
    CH: gl.constexpr = k_desc.block_type.shape[1]
    mbarrier.wait(kv_free.index(j), (it & 1) ^ 1)  # a fresh barrier passes phase 1
    mbarrier.expect(k_loaded.index(j), k_desc.block_type.nbytes)
    _tma_load(k_desc, [b, j * CH, h, 0], k_loaded.index(j), k_buf.index(j))
    mbarrier.expect(v_ready.index(j), v_desc.block_type.nbytes)
    _tma_load(v_desc, [b, j * CH, h, 0], v_ready.index(j), v_buf.index(j))


@gluon.jit
def _rotate_box(k_buf, k_loaded, kr_desc, c, s, b, h, j, phase, SAVE_ROT: gl.constexpr, num_warps: gl.constexpr):
    """K box j of head (b, h), once landed (k_loaded[j] at `phase`), rotated in place with the table c, s; SAVE_ROT:
    also stored to kr_desc (rows >= N clipped)."""
    CH: gl.constexpr = k_buf.shape[2]
    D: gl.constexpr = k_buf.shape[4]
    mbarrier.wait(k_loaded.index(j), phase)
    _rope_inplace(k_buf.index(j).reshape([CH, D]), c, s, 1.0, num_warps)
    fence_async_shared()
    _cta_barrier()  # this warpgroup's stores, before one thread arrives for all (and before the TMA store reads them)
    if SAVE_ROT:
        _tma_store(kr_desc, [b, j * CH, h, 0], k_buf.index(j))


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, qr_desc, kr_desc, q_buf, k_buf, v_buf, bars, cos_ptr, sin_ptr, stab_h,
                 stab_n, H, N, P, n_heads, qk_scale, NS: gl.constexpr, NKC: gl.constexpr, ROPE: gl.constexpr,
                 SAVE_ROT: gl.constexpr, EARLY_RELEASE: gl.constexpr, GROUPS: gl.constexpr):
    """Per head: each query slice into a free buffer by TMA, rotated in place (scale * log2 e folded in) ->
    q_ready; after the head's first slice, once the heads before are done with them (kv_empty), K and V by TMA in
    boxes (V straight to v_ready), each K box rotated as it lands -> k_ready. So the next head's first slice is
    ready while the last one of the head before is attended, and the attending warps start on K box 0 while the
    rest still arrive. SAVE_ROT: slices rotated without the scale, each rotated slice and K box also stored by TMA
    to qr_desc, kr_desc (waited for before its buffer is loaded again). EARLY_RELEASE: each K/V box is loaded as soon
    as the head before releases it (kv_free, in its last slice), one box ahead of the rotation. GROUPS (0: the
    attending warps are one partition): slice g goes to attending group g % GROUPS, into the next of its two
    buffers, and the head's first GROUPS slices are loaded before its K/V boxes, so that every group has one."""
    q_loaded, q_ready, q_empty, k_loaded, k_ready, v_ready, kv_empty = bars[:7]
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
            if GROUPS == 0:
                buf = g % 2
                n = g
            else:  # the group's own two buffers; n: the group's slices before this one
                buf = (g % GROUPS) * 2 + (g // GROUPS) % 2
                n = g // GROUPS
            mbarrier.wait(q_empty.index(buf), ((n // 2) & 1) ^ 1)  # a fresh barrier passes phase 1
            if SAVE_ROT:  # the stores from this buffer have read it (long done: the slice was attended since)
                tma.store_wait(0)
            mbarrier.expect(q_loaded.index(buf), q_desc.block_type.nbytes)
            _tma_load(q_desc, [b, si * SLICE_, h, 0], q_loaded.index(buf), q_buf.index(buf))
            if ROPE:  # in BLOCK_N-row steps: 32 values and 32 table entries per thread
                for r in gl.static_range(SLICE_ // CH):
                    c, s = _load_table(cos_base, sin_base, t0 + si * SLICE_ + r * CH, N, P, stab_n, CH, D,
                                       num_warps)
                    mbarrier.wait(q_loaded.index(buf), (n // 2) & 1)
                    _rope_inplace(q_buf.index(buf).reshape([SLICE_, D]).slice(r * CH, CH), c, s,
                                  1.0 if SAVE_ROT else qk_scale, num_warps)
            else:
                mbarrier.wait(q_loaded.index(buf), (n // 2) & 1)
            fence_async_shared()
            _cta_barrier()  # this warpgroup's stores, before one thread arrives for all
            if GROUPS == 0:
                mbarrier.arrive(q_ready.index(buf), count=1)
                if SAVE_ROT:
                    _tma_store(qr_desc, [b, si * SLICE_, h, 0], q_buf.index(buf))
            else:  # a group writes its o into the slice's buffer: the rotated slice must have left it
                if SAVE_ROT:
                    _tma_store(qr_desc, [b, si * SLICE_, h, 0], q_buf.index(buf))
                    tma.store_wait(0)
                mbarrier.arrive(q_ready.index(buf), count=1)
            if si == (0 if GROUPS == 0 else GROUPS - 1):
                if ROPE:  # box 0's table while the heads before finish with K and V
                    c, s = _load_table(cos_base, sin_base, t0, N, P, stab_n, CH, D, num_warps)
                if EARLY_RELEASE:
                    if SAVE_ROT:  # the K boxes' stores too, before the boxes are loaded again
                        tma.store_wait(0)
                    _load_box(k_desc, v_desc, k_buf, v_buf, k_loaded, v_ready, bars[7], b, h, 0, it)
                else:
                    mbarrier.wait(kv_empty, (it & 1) ^ 1)
                    if SAVE_ROT:  # the K boxes' stores too, before the boxes are loaded again
                        tma.store_wait(0)
                    for j in gl.static_range(NKC):  # in the order the first slice uses them
                        mbarrier.expect(k_loaded.index(j), k_desc.block_type.nbytes)
                        _tma_load(k_desc, [b, j * CH, h, 0], k_loaded.index(j), k_buf.index(j))
                        mbarrier.expect(v_ready.index(j), v_desc.block_type.nbytes)
                        _tma_load(v_desc, [b, j * CH, h, 0], v_ready.index(j), v_buf.index(j))
                for j in range(NKC):  # a dynamic loop: unrolled, all ten boxes' table loads are hoisted and spill
                    if EARLY_RELEASE:
                        if j + 1 < NKC:
                            _load_box(k_desc, v_desc, k_buf, v_buf, k_loaded, v_ready, bars[7], b, h, j + 1, it)
                    if ROPE:  # the next box's table in flight while this one rotates
                        c_next, s_next = _load_table(cos_base, sin_base, t0 + (j + 1) * CH, N, P, stab_n, CH, D,
                                                     num_warps)
                        _rotate_box(k_buf, k_loaded, kr_desc, c, s, b, h, j, it & 1, SAVE_ROT, num_warps)
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
               N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr, EARLY_RELEASE: gl.constexpr,
               num_warps: gl.constexpr):
    """The attending warpgroups: each ready query slice over all keys (`_attend_slice`, waiting on the boxes in a
    head's first slice), its buffer released (and after a head's last slice, K and V; EARLY_RELEASE: box by box
    during that slice), o by TMA through o_buf."""
    q_loaded, q_ready, q_empty, k_loaded, k_ready, v_ready, kv_empty = bars[:7]
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
            elif EARLY_RELEASE:  # the last slice releases the boxes one by one
                if si == NS - 1:
                    acc, m_i, l_i = _attend_slice(q_s, k_buf, v_buf, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps,
                                                  kv_free=bars[7], RELEASE=True)
                else:
                    acc, m_i, l_i = _attend_slice(q_s, k_buf, v_buf, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps)
            else:  # without the waits, whose shared-memory fences would join the warpgroups at every chunk
                acc, m_i, l_i = _attend_slice(q_s, k_buf, v_buf, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps)
            tma.store_wait(0)  # the slice before's o has left o_buf
            _cta_barrier()  # both warpgroups are done with q_s (after a head's last slice: with K and V)
            mbarrier.arrive(q_empty.index(buf), count=1)
            if not EARLY_RELEASE:
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


@gluon.constexpr_function
def _one_slice_may_be_first_and_last(ns, groups):
    """Whether a group's first slice of a head can be its last too (fewer than two slices per group): that slice
    then waits for the boxes and releases them."""
    return ns < 2 * groups


@gluon.jit
def _group_slice(q_s4, k_buf, v_buf, bars, o_desc, lse_ptr, tile, H, N, sm_scale, si, first, last, phase,
                 NS: gl.constexpr, N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr,
                 GROUPS: gl.constexpr, num_warps: gl.constexpr):
    """A group's query slice si (its buffer q_s4) over all keys, unpipelined (`_attend_slice_serial`: 120
    registers), waiting on the boxes if it is the group's first of the head, releasing them box by box if its
    last; then `_end_slice`."""
    k_ready, v_ready, kv_free = bars[4], bars[5], bars[7]
    SLICE_: gl.constexpr = q_s4.shape[1]
    D: gl.constexpr = q_s4.shape[3]
    q_s = q_s4.reshape([SLICE_, D])
    if first:  # K and V may still be arriving
        if _one_slice_may_be_first_and_last(NS, GROUPS) and last:
            acc, m_i, l_i = _attend_slice_serial(q_s, k_buf, v_buf, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps,
                                                 k_ready, v_ready, phase, True, kv_free, True)
        else:
            acc, m_i, l_i = _attend_slice_serial(q_s, k_buf, v_buf, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps,
                                                 k_ready, v_ready, phase, True)
    elif last:
        acc, m_i, l_i = _attend_slice_serial(q_s, k_buf, v_buf, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps,
                                             kv_free=kv_free, RELEASE=True)
    else:
        acc, m_i, l_i = _attend_slice_serial(q_s, k_buf, v_buf, N, sm_scale, N_FULL, MID_N, TAIL_N, num_warps)
    _end_slice(q_s4, acc / gl.expand_dims(l_i, 1), m_i + gl.log2(l_i), o_desc, lse_ptr, tile, H, N, si)


@gluon.jit
def _group_tail(q_s4, k_buf, v_buf, pt_s, bars, o_desc, lse_ptr, tile, H, N, sm_scale, si, phase,
                num_warps: gl.constexpr):
    """A group's swapped last slice (`_attend_tail` over every K/V box, releasing each: the last slice of a head is
    its group's last), then `_end_slice` of its TAIL_Q rows."""
    SLICE_: gl.constexpr = q_s4.shape[1]
    D: gl.constexpr = q_s4.shape[3]
    q_s = q_s4.reshape([SLICE_, D])
    o_t, m_i, l_i = _attend_tail(q_s, k_buf, v_buf, pt_s, N, sm_scale, k_buf.shape[0], bars[4], bars[5], phase,
                                 bars[7], True, num_warps)
    _end_slice(q_s4, gl.permute(o_t / gl.expand_dims(l_i, 0), [1, 0]), m_i + gl.log2(l_i), o_desc, lse_ptr, tile, H,
               N, si)


@gluon.jit
def _end_slice(q_s4, o, lse, o_desc, lse_ptr, tile, H, N, si):
    """A group's slice done: lse [R] (log2 units) and o [R, D] (normalised) of query slice si's first R rows (rows
    >= N clipped), o by TMA through the slice's buffer q_s4 [1, SLICE, 1, D], whose rows past R are past N."""
    SLICE_: gl.constexpr = q_s4.shape[1]
    D: gl.constexpr = q_s4.shape[3]
    R: gl.constexpr = o.shape[0]
    _cta_barrier()  # the group's warps are done with the slice's buffer
    rows = si * SLICE_ + gl.arange(0, R, layout=lse.type.layout)
    gl.store(lse_ptr + tile.to(gl.int64) * N + rows, lse, mask=rows < N)
    q_s4.reshape([SLICE_, D]).slice(0, R).store(o.to(q_s4.dtype))
    fence_async_shared()
    _cta_barrier()
    _tma_store(o_desc, [tile // H, si * SLICE_, tile % H, 0], q_s4)


@gluon.jit
def _ws_attend_group(q_buf, k_buf, v_buf, pt_buf, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS: gl.constexpr,
                     N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr, TAIL_Q: gl.constexpr,
                     GROUP: gl.constexpr, GROUPS: gl.constexpr, num_warps: gl.constexpr):
    """Attending group GROUP of GROUPS (one warpgroup, a partition of its own): the program's query slices
    g = GROUP, GROUP + GROUPS, ... (counted over its heads) through its two buffers, each over all keys
    (`_group_slice`: waiting on the boxes in its first slice of a head, releasing them box by box in its last,
    kv_free counting GROUPS arrivals). TAIL_Q (0: none): the
    head's last slice holds at most TAIL_Q rows and is computed swapped (`_group_tail`, through the group's pt_buf).
    o leaves by TMA from the slice's own buffer, which goes back to the producer once that store has read it, at
    the group's next slice."""
    q_ready, q_empty = bars[1], bars[2]
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    it = 0
    n = 0  # this group's slices so far
    for tile in range(pid, n_heads, nprog):
        first = (GROUP - (it * NS) % GROUPS + GROUPS) % GROUPS  # this group's first slice of the head
        for si in range(first, NS, GROUPS):
            buf = GROUP * 2 + n % 2
            mbarrier.wait(q_ready.index(buf), (n // 2) & 1)
            if n > 0:  # the previous slice's o has left the other buffer: the producer may refill it
                tma.store_wait(0)
                _cta_barrier()
                mbarrier.arrive(q_empty.index(GROUP * 2 + (n + 1) % 2), count=1)
            last = si + GROUPS >= NS
            if TAIL_Q > 0:
                if si == NS - 1:  # the head's last slice is every group's last: its boxes may be released
                    _group_tail(q_buf.index(buf), k_buf, v_buf, pt_buf.index(GROUP), bars, o_desc, lse_ptr, tile, H,
                                N, sm_scale, si, it & 1, num_warps)
                else:
                    _group_slice(q_buf.index(buf), k_buf, v_buf, bars, o_desc, lse_ptr, tile, H, N, sm_scale, si,
                                 si == first, last, it & 1, NS, N_FULL, MID_N, TAIL_N, GROUPS, num_warps)
            else:
                _group_slice(q_buf.index(buf), k_buf, v_buf, bars, o_desc, lse_ptr, tile, H, N, sm_scale, si,
                             si == first, last, it & 1, NS, N_FULL, MID_N, TAIL_N, GROUPS, num_warps)
            n += 1
        it += 1
    tma.store_wait(0)


@gluon.jit
def long_fwd_kernel(q_desc, k_desc, v_desc, o_desc, qr_desc, kr_desc, lse_ptr, cos_ptr, sin_ptr, stab_h, stab_n, H,
                    N, P, n_heads, qk_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr,
                    ROPE: gl.constexpr, SAVE_ROT: gl.constexpr, ROT_ROWS: gl.constexpr, ROT_CHUNKS: gl.constexpr,
                    EARLY_RELEASE: gl.constexpr, ATTEND_GROUPS: gl.constexpr, TAIL_Q: gl.constexpr):
    """Persistent: program i takes heads i, i + grid, ... (n_heads = B * H). Per head, K and V arrive by TMA in
    boxes of BLOCK_N rows (rows past N as zeros), the queries in SLICE-row slices through two buffers. A producer
    warpgroup issues the loads and rotates each slice and K box in place (`_ws_producer`); the kernel's num_warps
    attend (`_ws_attend`); mbarriers hand each buffer over. ROT_CHUNKS: query slices per head (ROT_ROWS = SLICE
    rows each). SAVE_ROT: the producer writes the rotated q and k to qr_desc, kr_desc too. EARLY_RELEASE: a head's
    last slice hands each K/V box back as soon as it is done with it (one mbarrier per box), so the next head's
    boxes load and rotate during that slice instead of after it. ATTEND_GROUPS (0: as above; 3, with num_warps = 4,
    64-row slices and EARLY_RELEASE): three warpgroups attend, each a partition of its own with its own two slice
    buffers (`_ws_attend_group`), taking the slices in turn, so a head of NS slices takes about NS / 3 slice times
    instead of NS / 2 rounded up (FA3's 192-row tiles at D = 64).
    TAIL_Q (0: none; with groups): the last slice holds at most TAIL_Q rows (N = 577: one) and is computed with keys
    as the MMA's rows and its TAIL_Q queries as columns (`_attend_tail`)."""
    SLICE_: gl.constexpr = q_desc.block_type.shape[1]
    CH: gl.constexpr = k_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    NS: gl.constexpr = ROT_CHUNKS
    NKC: gl.constexpr = N_FULL + (1 if MID_N + TAIL_N > 0 else 0)  # K/V boxes
    num_warps: gl.constexpr = gl.num_warps()
    gl.static_assert(ROT_ROWS == SLICE_ and CH == _BLOCK_N and SLICE_ == 16 * num_warps)
    gl.static_assert(MID_N + TAIL_N <= CH)
    gl.static_assert(NS >= 2 or not EARLY_RELEASE)  # one slice would wait for boxes it never releases
    gl.static_assert(ATTEND_GROUPS == 0 or (ATTEND_GROUPS == 3 and num_warps == 4 and NS >= ATTEND_GROUPS
                                            and EARLY_RELEASE))
    gl.static_assert(TAIL_Q == 0 or (ATTEND_GROUPS > 0 and TAIL_Q % 16 == 0 and TAIL_Q <= 64))
    QB: gl.constexpr = 2 if ATTEND_GROUPS == 0 else 2 * ATTEND_GROUPS  # query slice buffers
    q_buf = gl.allocate_shared_memory(q_desc.dtype, [QB, 1, SLICE_, 1, D], q_desc.layout)
    if ATTEND_GROUPS == 0:  # the groups write o through their slice's buffer
        o_buf = gl.allocate_shared_memory(o_desc.dtype, [1, SLICE_, 1, D], o_desc.layout)
    if TAIL_Q > 0:  # each group's P^T of the swapped last slice
        pt_buf = gl.allocate_shared_memory(q_desc.dtype, [ATTEND_GROUPS, CH, TAIL_Q],
                                           gl.NVMMASharedLayout(swizzle_byte_width=_swizzle(TAIL_Q * 2),
                                                                element_bitwidth=16, rank=2))
    else:
        pt_buf = q_buf  # not read
    k_buf = gl.allocate_shared_memory(k_desc.dtype, [NKC, 1, CH, 1, D], k_desc.layout)
    v_buf = gl.allocate_shared_memory(v_desc.dtype, [NKC, 1, CH, 1, D], v_desc.layout)
    q_loaded = gl.allocate_shared_memory(gl.int64, [QB, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [QB, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [QB, 1], mbarrier.MBarrierLayout())
    k_loaded = gl.allocate_shared_memory(gl.int64, [NKC, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NKC, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NKC, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ATTENDERS: gl.constexpr = 1 if ATTEND_GROUPS == 0 else ATTEND_GROUPS  # arrivals that free K and V
    for i in gl.static_range(QB):
        mbarrier.init(q_loaded.index(i), count=1)
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    for j in gl.static_range(NKC):
        mbarrier.init(k_loaded.index(j), count=1)
        mbarrier.init(k_ready.index(j), count=1)
        mbarrier.init(v_ready.index(j), count=1)
    mbarrier.init(kv_empty, count=ATTENDERS)
    fence_async_shared()
    _cta_barrier()

    bars = (q_loaded, q_ready, q_empty, k_loaded, k_ready, v_ready, kv_empty)
    if EARLY_RELEASE:
        kv_free = gl.allocate_shared_memory(gl.int64, [NKC, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(NKC):
            mbarrier.init(kv_free.index(j), count=ATTENDERS)
        fence_async_shared()
        _cta_barrier()
        bars = (q_loaded, q_ready, q_empty, k_loaded, k_ready, v_ready, kv_empty, kv_free)
    if ROPE and not SAVE_ROT:
        sm_scale = 1.0  # folded into q
    else:
        sm_scale = qk_scale
    if ATTEND_GROUPS == 0:
        gl.warp_specialize([
            (_ws_attend, (q_buf, k_buf, v_buf, o_buf, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS, N_FULL,
                          MID_N, TAIL_N, EARLY_RELEASE, num_warps)),
            (_ws_producer, (q_desc, k_desc, v_desc, qr_desc, kr_desc, q_buf, k_buf, v_buf, bars, cos_ptr, sin_ptr,
                            stab_h, stab_n, H, N, P, n_heads, qk_scale, NS, NKC, ROPE, SAVE_ROT, EARLY_RELEASE,
                            ATTEND_GROUPS)),
        ], [_WS_PRODUCER_WARPS], [_WS_PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_ws_attend_group, (q_buf, k_buf, v_buf, pt_buf, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS,
                                N_FULL, MID_N, TAIL_N, TAIL_Q, 0, 3, num_warps)),
            (_ws_attend_group, (q_buf, k_buf, v_buf, pt_buf, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS,
                                N_FULL, MID_N, TAIL_N, TAIL_Q, 1, 3, num_warps)),
            (_ws_attend_group, (q_buf, k_buf, v_buf, pt_buf, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS,
                                N_FULL, MID_N, TAIL_N, TAIL_Q, 2, 3, num_warps)),
            (_ws_producer, (q_desc, k_desc, v_desc, qr_desc, kr_desc, q_buf, k_buf, v_buf, bars, cos_ptr, sin_ptr,
                            stab_h, stab_n, H, N, P, n_heads, qk_scale, NS, NKC, ROPE, SAVE_ROT, EARLY_RELEASE,
                            ATTEND_GROUPS)),
        ], [num_warps, num_warps, _WS_PRODUCER_WARPS],
        [_WS_3_GROUP_REGS, _WS_3_GROUP_REGS, _WS_3_PRODUCER_REGS])
    for i in gl.static_range(QB):
        mbarrier.invalidate(q_loaded.index(i))
        mbarrier.invalidate(q_ready.index(i))
        mbarrier.invalidate(q_empty.index(i))
    for j in gl.static_range(NKC):
        mbarrier.invalidate(k_loaded.index(j))
        mbarrier.invalidate(k_ready.index(j))
        mbarrier.invalidate(v_ready.index(j))
    mbarrier.invalidate(kv_empty)
    if EARLY_RELEASE:
        for j in gl.static_range(NKC):
            mbarrier.invalidate(bars[7].index(j))
