"""The streaming Gluon forward of triton_fa_rope's Hopper forwards (`gluon_fwd` plans and launches it): past 640
tokens K and V of a head no longer fit shared memory together, so K stays resident (rotated once per head, as in
`gluon_long_kernels.long_fwd_kernel`) and V streams through a ring of 64-row boxes.

    stream_fwd_kernel  640 < N <= gluon_fwd.STREAM_MAX_N, warp-specialized: three attending warpgroups take a
                       head's 64-row query slices in rounds (round r: slices 3r, 3r + 1, 3r + 2), each slice over
                       all keys; a producer warpgroup loads and rotates the query slices and K boxes and feeds the V
                       ring, one V box per key chunk of a round, which all three groups read before it is refilled.

The producer's schedule follows the V ring: the loads it waits on free up as the groups move along the keys, so
the other work is placed where it cannot wait on itself. A head's first query slices come before its K boxes; in
round 0 each K box is loaded one box ahead and rotated after its V box is issued; round r + 1's query slices are
loaded once round r's V box V_SLOTS_ is issued (every group has started round r, so their buffers are free) and
rotated one per box after it. The ring's depth V_SLOTS_ is the config table's `stream_v_slots` (2 to 5: four with
the 18 K boxes of 1152 tokens and the six query buffers fill 224 KiB). With the table's `stream_overlap` the groups'
key loop issues a box's S = Q K^T before the last box's P V (`_overlapped_boxes`, FA3's intra-warpgroup overlap),
which needs 128 registers a group, so the producer gets 120 (`_registers`). Read top-down: the groups' key loop,
the producer, the kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_wait)

from attnhub.backends.triton_fa_rope.gluon_kernels import (_BLOCK_N, _attend_chunk, _cta_barrier, _invalidate,
                                                            _issue_scores, _load_table, _mbarriers, _pv,
                                                            _rope_inplace, _softmax_init, _softmax_step, _tma_load,
                                                            _tma_store)
from attnhub.backends.triton_fa_rope.gluon_long_kernels import _end_slice, _rotate_box

GROUPS = 3  # attending warpgroups, a round of 64-row slices each: FA3's 192-row tile at D = 64
_GROUPS = gl.constexpr(GROUPS)
# 16 warps: the launch's cap is 65,536 / 512 threads = 128 registers. The groups' unpipelined key loop fits 120, the
# producer takes 144 (`gluon_long_kernels`: the same split as the long kernel's three groups); the overlapped loop
# spills 84-140 bytes at 120 and none at 128, so there the producer gets 120 (it spills 4-20 bytes at 1029 tokens in
# bf16, 88-96 at 1152 in fp16: benchmarks/README.md)
MAXNREG = 128


@gluon.constexpr_function
def _registers(overlap):
    """setmaxnreg of the worker partitions: attending groups 1 and 2, the producer (group 0 is the default one)."""
    return [128, 128, 120] if overlap else [120, 120, 144]


# ---------------------------------------------------------------------------------------------------------------
# The attending groups
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def _release(v_empty, slot, kv_free, box, last):
    """The group's P V of V slot `slot` (K box `box`) is done: the slot back to the producer; in the group's last
    slice of a head (`last`), K box `box` too."""
    _cta_barrier()  # one thread arrives for the warpgroup
    mbarrier.arrive(v_empty.index(slot), count=1)
    mbarrier.arrive(kv_free.index(box), count=1, pred=last)


@gluon.jit
def _p_operand(p, dtype: gl.constexpr, acc):
    """p [M, CH] fp32 -> wgmma's A operand from registers in V's dtype (`gluon_kernels._pv`'s), kept as a value of
    its own: the overlapped loop waits on it (its registers are read until the P V product is done)."""
    return gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2))


@gluon.jit
def _overlapped_boxes(q_s, k_buf, v_ring, bars, vc, phase, first, last, N, sm_scale, acc, m_i, l_i,
                      N_FULL: gl.constexpr, num_warps: gl.constexpr):
    """`_attend_stream`'s whole boxes with FA3's intra-warpgroup overlap: box j's S = Q K^T is issued before box
    j - 1's P V, and its softmax runs while that P V is on the tensor cores (one more S tile live: 32 registers).
    The waits keep the key loop's order (K box j before V box j - 1: `_attend_stream`); box j - 1 goes back once
    its P V is done."""
    gl.static_assert(N_FULL >= 1)  # box 0 is taken before the loop
    k_ready, kv_free, v_ready, v_empty = bars[4], bars[5], bars[6], bars[7]
    CH: gl.constexpr = k_buf.shape[2]
    D: gl.constexpr = k_buf.shape[4]
    R: gl.constexpr = v_ring.shape[0]
    mbarrier.wait(k_ready.index(0), phase, pred=first)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(_issue_scores(q_s, k_buf.index(0).reshape([CH, D]), num_warps),))
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, N, sm_scale, False)
    for j in range(1, N_FULL):
        mbarrier.wait(k_ready.index(j), phase, pred=first)
        s = _issue_scores(q_s, k_buf.index(j).reshape([CH, D]), num_warps)
        slot = (vc + j - 1) % R
        mbarrier.wait(v_ready.index(slot), ((vc + j - 1) // R) & 1)
        p_op = _p_operand(p, v_ring.dtype, acc)
        acc = warpgroup_mma(p_op, v_ring.index(slot).reshape([CH, D]), acc * gl.expand_dims(alpha, 1), is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))  # wgmma groups retire in order: S before P V
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j * CH, N, sm_scale, False)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))  # P V read p_op's registers until now
        _release(v_empty, slot, kv_free, j - 1, last)
    slot = (vc + N_FULL - 1) % R
    mbarrier.wait(v_ready.index(slot), ((vc + N_FULL - 1) // R) & 1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(_pv(p, v_ring.index(slot).reshape([CH, D]),
                                                          acc * gl.expand_dims(alpha, 1)),))
    _release(v_empty, slot, kv_free, N_FULL - 1, last)
    return acc, m_i, l_i


@gluon.jit
def _attend_stream(q_s, k_buf, v_ring, bars, vc, phase, first, last, N, sm_scale, N_FULL: gl.constexpr,
                   MID_N: gl.constexpr, TAIL_N: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    """One query slice q_s [M, D] over all keys -> acc [M, D] fp32 (unnormalised), m_i, l_i: per 64-key box, K from
    its resident box (waited for in the group's first slice of a head, `first`, at the head's `phase`; released in
    its last, `last`), V from ring box vc + j (`_release`); each chunk's S, softmax and P V in turn (120
    registers; OVERLAP: the whole boxes through `_overlapped_boxes`). The last box holds a half-width chunk (MID_N)
    and a masked one (TAIL_N), either possibly absent."""
    k_ready, kv_free, v_ready, v_empty = bars[4], bars[5], bars[6], bars[7]
    M: gl.constexpr = q_s.shape[0]
    D: gl.constexpr = q_s.shape[1]
    CH: gl.constexpr = k_buf.shape[2]
    R: gl.constexpr = v_ring.shape[0]
    acc, m_i, l_i = _softmax_init(M, D, num_warps)
    if OVERLAP:
        acc, m_i, l_i = _overlapped_boxes(q_s, k_buf, v_ring, bars, vc, phase, first, last, N, sm_scale, acc, m_i,
                                          l_i, N_FULL, num_warps)
    for j in range(0 if OVERLAP else N_FULL):
        # K before V: a group idle in the last round skipped its V boxes, so a slot's load of then may be in flight
        # and the V wait pass early; k_ready[j] comes after `_issue_v(j)` saw that load read (test_stream_schedule)
        mbarrier.wait(k_ready.index(j), phase, pred=first)
        slot = (vc + j) % R
        mbarrier.wait(v_ready.index(slot), ((vc + j) // R) & 1)
        acc, m_i, l_i = _attend_chunk(q_s, k_buf.index(j).reshape([CH, D]), v_ring.index(slot).reshape([CH, D]),
                                      acc, m_i, l_i, j * CH, N, sm_scale, False, num_warps)
        _release(v_empty, slot, kv_free, j, last)
    if MID_N + TAIL_N > 0:
        mbarrier.wait(k_ready.index(N_FULL), phase, pred=first)  # K before V, as above
        slot = (vc + N_FULL) % R
        mbarrier.wait(v_ready.index(slot), ((vc + N_FULL) // R) & 1)
        k_box = k_buf.index(N_FULL).reshape([CH, D])
        v_box = v_ring.index(slot).reshape([CH, D])
        if MID_N > 0:
            acc, m_i, l_i = _attend_chunk(q_s, k_box.slice(0, MID_N), v_box.slice(0, MID_N), acc, m_i, l_i,
                                          N_FULL * CH, N, sm_scale, False, num_warps)
        if TAIL_N > 0:
            acc, m_i, l_i = _attend_chunk(q_s, k_box.slice(MID_N, TAIL_N), v_box.slice(MID_N, TAIL_N), acc, m_i,
                                          l_i, N_FULL * CH + MID_N, N, sm_scale, True, num_warps)
        _release(v_empty, slot, kv_free, N_FULL, last)
    return acc, m_i, l_i


@gluon.constexpr_function
def _group_slices(group, ns):
    """Slices of a head that attending group `group` takes (slices group, group + 3, ... < ns)."""
    return (ns - group + GROUPS - 1) // GROUPS


@gluon.jit
def _stream_group(q_buf, k_buf, v_ring, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS: gl.constexpr,
                  N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr, GROUP: gl.constexpr,
                  OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    """Attending group GROUP (one warpgroup, a partition of its own): slice 3r + GROUP of each round r of every
    head of the program, through the group's two query buffers (o leaves by TMA from the slice's own buffer, which
    goes back to the producer once that store has read it, at the group's next slice). Its ring position counts
    every round of every head, those it has no slice in too (the producer arrives for it there)."""
    q_ready, q_empty = bars[1], bars[2]
    SLICE_: gl.constexpr = q_buf.shape[2]
    D: gl.constexpr = q_buf.shape[4]
    NKC: gl.constexpr = N_FULL + (1 if MID_N + TAIL_N > 0 else 0)
    NR: gl.constexpr = (NS + _GROUPS - 1) // _GROUPS
    A: gl.constexpr = _group_slices(GROUP, NS)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    it = 0
    for tile in range(pid, n_heads, nprog):
        for r in range(A):
            n = it * A + r  # the group's slices so far
            buf = GROUP * 2 + n % 2
            mbarrier.wait(q_ready.index(buf), (n // 2) & 1)
            if n > 0:  # the previous slice's o has left the other buffer: the producer may refill it
                tma.store_wait(0)
                _cta_barrier()
                mbarrier.arrive(q_empty.index(GROUP * 2 + (n + 1) % 2), count=1)
            q_s4 = q_buf.index(buf)
            acc, m_i, l_i = _attend_stream(q_s4.reshape([SLICE_, D]), k_buf, v_ring, bars, (it * NR + r) * NKC,
                                           it & 1, r == 0, r == A - 1, N, sm_scale, N_FULL, MID_N, TAIL_N, OVERLAP,
                                           num_warps)
            _end_slice(q_s4, acc / gl.expand_dims(l_i, 1), m_i + gl.log2(l_i), o_desc, lse_ptr, tile, H, N,
                       r * _GROUPS + GROUP)
        it += 1
    tma.store_wait(0)


# ---------------------------------------------------------------------------------------------------------------
# The producer
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def _slice_buffer(si, it, NS: gl.constexpr):
    """Query slice si of the program's it-th head -> (its buffer, its group's slices before it)."""
    g = si % _GROUPS
    n = it * ((NS - g + _GROUPS - 1) // _GROUPS) + si // _GROUPS
    return g * 2 + n % 2, n


@gluon.jit
def _load_slice(q_desc, q_buf, bars, b, h, si, it, NS: gl.constexpr):
    """Query slice si into its group's next buffer by TMA, once the group is done with that buffer (q_empty)."""
    q_loaded, q_empty = bars[0], bars[2]
    SLICE_: gl.constexpr = q_desc.block_type.shape[1]
    buf, n = _slice_buffer(si, it, NS)
    mbarrier.wait(q_empty.index(buf), ((n // 2) & 1) ^ 1)  # a fresh barrier passes phase 1
    mbarrier.expect(q_loaded.index(buf), q_desc.block_type.nbytes)
    _tma_load(q_desc, [b, si * SLICE_, h, 0], q_loaded.index(buf), q_buf.index(buf))


@gluon.jit
def _rotate_slice(q_buf, qr_desc, bars, cos_base, sin_base, t0, b, h, si, it, N, P, stab_n, qk_scale,
                  NS: gl.constexpr, ROPE: gl.constexpr, SAVE_ROT: gl.constexpr):
    """Query slice si, once landed, rotated in place (scale * log2 e folded in unless SAVE_ROT) -> q_ready; SAVE_ROT:
    the rotated slice also to qr_desc, waited for (the group writes o into the buffer)."""
    q_loaded, q_ready = bars[0], bars[1]
    SLICE_: gl.constexpr = q_buf.shape[2]
    D: gl.constexpr = q_buf.shape[4]
    num_warps: gl.constexpr = gl.num_warps()
    buf, n = _slice_buffer(si, it, NS)
    if ROPE:
        c, s = _load_table(cos_base, sin_base, t0 + si * SLICE_, N, P, stab_n, SLICE_, D, num_warps)
        mbarrier.wait(q_loaded.index(buf), (n // 2) & 1)
        _rope_inplace(q_buf.index(buf).reshape([SLICE_, D]), c, s, 1.0 if SAVE_ROT else qk_scale, num_warps)
    else:
        mbarrier.wait(q_loaded.index(buf), (n // 2) & 1)
    fence_async_shared()
    _cta_barrier()  # this warpgroup's stores, before one thread arrives for all
    if SAVE_ROT:
        _tma_store(qr_desc, [b, si * SLICE_, h, 0], q_buf.index(buf))
        tma.store_wait(0)
    mbarrier.arrive(q_ready.index(buf), count=1)


@gluon.jit
def _next_round_slices(q_desc, qr_desc, q_buf, bars, cos_base, sin_base, t0, b, h, r, j, it, N, P, stab_n, qk_scale,
                       NS: gl.constexpr, ROPE: gl.constexpr, SAVE_ROT: gl.constexpr, V_AHEAD: gl.constexpr):
    """At V box j of round r: round r + 1's slices loaded at box V_AHEAD (issuing it waited for every group to be
    done with round r's box 0, so they have all started round r and freed the buffers), rotated one per box
    after it."""
    if r + 1 < (NS + _GROUPS - 1) // _GROUPS:
        if j == V_AHEAD:
            for g in gl.static_range(_GROUPS):
                if (r + 1) * _GROUPS + g < NS:
                    _load_slice(q_desc, q_buf, bars, b, h, (r + 1) * _GROUPS + g, it, NS)
        for g in gl.static_range(_GROUPS):
            if j == V_AHEAD + 1 + g and (r + 1) * _GROUPS + g < NS:
                _rotate_slice(q_buf, qr_desc, bars, cos_base, sin_base, t0, b, h, (r + 1) * _GROUPS + g, it, N, P,
                              stab_n, qk_scale, NS, ROPE, SAVE_ROT)


@gluon.jit
def _issue_v(v_desc, v_ring, bars, b, h, j, vc, idle: gl.constexpr):
    """V box j of head (b, h) into ring slot vc % R once all three groups are done with its previous box; `idle`
    groups have no slice in this round: the producer arrives for them."""
    v_ready, v_empty = bars[6], bars[7]
    CH: gl.constexpr = v_desc.block_type.shape[1]
    R: gl.constexpr = v_ring.shape[0]
    slot = vc % R
    mbarrier.wait(v_empty.index(slot), ((vc // R) & 1) ^ 1)  # a fresh barrier passes phase 1
    mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
    _tma_load(v_desc, [b, j * CH, h, 0], v_ready.index(slot), v_ring.index(slot))
    if idle > 0:
        mbarrier.arrive(v_empty.index(slot), count=idle)
    return vc + 1


@gluon.jit
def _load_k_box(k_desc, k_buf, bars, b, h, j, it, STORES_DONE: gl.constexpr):
    """K box j of head (b, h) by TMA, once the groups of the head before are done with it (kv_free). STORES_DONE
    (box 0 with SAVE_ROT): first wait for this warpgroup's stores, the head before's rotated K boxes among them."""
    k_loaded, kv_free = bars[3], bars[5]
    CH: gl.constexpr = k_desc.block_type.shape[1]
    mbarrier.wait(kv_free.index(j), (it & 1) ^ 1)  # a fresh barrier passes phase 1
    if STORES_DONE:
        tma.store_wait(0)
    mbarrier.expect(k_loaded.index(j), k_desc.block_type.nbytes)
    _tma_load(k_desc, [b, j * CH, h, 0], k_loaded.index(j), k_buf.index(j))


@gluon.jit
def _stream_producer(q_desc, k_desc, v_desc, qr_desc, kr_desc, q_buf, k_buf, v_ring, bars, cos_ptr, sin_ptr, stab_h,
                     stab_n, H, N, P, n_heads, qk_scale, NS: gl.constexpr, NKC: gl.constexpr, ROPE: gl.constexpr,
                     SAVE_ROT: gl.constexpr):
    """Per head: round 0's query slices; then round 0's key boxes, each K box loaded one ahead, its V box issued
    and the K box rotated in place -> k_ready (SAVE_ROT: also stored to kr_desc); then the V boxes of rounds
    1, 2, ...; from each round's box V_SLOTS_ on, the next round's slices (`_next_round_slices`)."""
    k_loaded, k_ready = bars[3], bars[4]
    CH: gl.constexpr = k_desc.block_type.shape[1]
    D: gl.constexpr = k_desc.block_type.shape[3]
    R: gl.constexpr = v_ring.shape[0]
    NR: gl.constexpr = (NS + _GROUPS - 1) // _GROUPS
    IDLE: gl.constexpr = _GROUPS * NR - NS  # groups without a slice in a head's last round
    num_warps: gl.constexpr = gl.num_warps()
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    it = 0
    vc = 0
    for tile in range(pid, n_heads, nprog):
        b = tile // H
        h = tile % H
        t0 = tile // n_heads  # 0, opaque to the compiler (`gluon_kernels._head`)
        cos_base = cos_ptr + h.to(gl.int64) * stab_h
        sin_base = sin_ptr + h.to(gl.int64) * stab_h
        for g in gl.static_range(_GROUPS):
            _load_slice(q_desc, q_buf, bars, b, h, g, it, NS)
        for g in gl.static_range(_GROUPS):
            _rotate_slice(q_buf, qr_desc, bars, cos_base, sin_base, t0, b, h, g, it, N, P, stab_n, qk_scale, NS,
                          ROPE, SAVE_ROT)
        _load_k_box(k_desc, k_buf, bars, b, h, 0, it, SAVE_ROT)
        if ROPE:  # box 0's table
            c, s = _load_table(cos_base, sin_base, t0, N, P, stab_n, CH, D, num_warps)
        for j in range(NKC):  # round 0 (a dynamic loop: unrolled, every box's table load is hoisted and spills)
            if j + 1 < NKC:
                _load_k_box(k_desc, k_buf, bars, b, h, j + 1, it, False)
            vc = _issue_v(v_desc, v_ring, bars, b, h, j, vc, IDLE if NR == 1 else 0)
            if ROPE:  # the next box's table in flight while this one rotates
                c_next, s_next = _load_table(cos_base, sin_base, t0 + (j + 1) * CH, N, P, stab_n, CH, D, num_warps)
                _rotate_box(k_buf, k_loaded, kr_desc, c, s, b, h, j, it & 1, SAVE_ROT, num_warps)
                c = c_next
                s = s_next
            else:
                mbarrier.wait(k_loaded.index(j), it & 1)
            mbarrier.arrive(k_ready.index(j), count=1)
            _next_round_slices(q_desc, qr_desc, q_buf, bars, cos_base, sin_base, t0, b, h, 0, j, it, N, P, stab_n,
                               qk_scale, NS, ROPE, SAVE_ROT, R)
        for r in range(1, NR - 1):
            for j in range(NKC):
                vc = _issue_v(v_desc, v_ring, bars, b, h, j, vc, 0)
                _next_round_slices(q_desc, qr_desc, q_buf, bars, cos_base, sin_base, t0, b, h, r, j, it, N, P,
                                   stab_n, qk_scale, NS, ROPE, SAVE_ROT, R)
        if NR > 1:  # the last round: no slices after it, the idle groups arrived for
            for j in range(NKC):
                vc = _issue_v(v_desc, v_ring, bars, b, h, j, vc, IDLE)
        it += 1
    if SAVE_ROT:
        tma.store_wait(0)


# ---------------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------------


@gluon.jit
def stream_fwd_kernel(q_desc, k_desc, v_desc, o_desc, qr_desc, kr_desc, lse_ptr, cos_ptr, sin_ptr, stab_h, stab_n,
                      H, N, P, n_heads, qk_scale, N_FULL: gl.constexpr, MID_N: gl.constexpr, TAIL_N: gl.constexpr,
                      ROPE: gl.constexpr, SAVE_ROT: gl.constexpr, ROT_ROWS: gl.constexpr, ROT_CHUNKS: gl.constexpr,
                      V_SLOTS_: gl.constexpr, OVERLAP_: gl.constexpr):
    """Persistent: program i takes heads i, i + grid, ... (n_heads = B * H). Per head, K arrives by TMA in boxes of
    BLOCK_N rows (rows past N as zeros) and stays; the queries in ROT_CHUNKS slices of ROT_ROWS = 64 rows, two
    buffers per attending group; V through V_SLOTS_ ring boxes, one per key chunk of each round of three slices.
    The producer (`_stream_producer`) loads, rotates and feeds the ring; the groups (`_stream_group`) attend;
    mbarriers hand each buffer over. SAVE_ROT: the producer writes the rotated q and k to qr_desc, kr_desc too."""
    SLICE_: gl.constexpr = q_desc.block_type.shape[1]
    CH: gl.constexpr = k_desc.block_type.shape[1]
    D: gl.constexpr = q_desc.block_type.shape[3]
    NS: gl.constexpr = ROT_CHUNKS
    NKC: gl.constexpr = N_FULL + (1 if MID_N + TAIL_N > 0 else 0)  # K boxes
    QB: gl.constexpr = 2 * _GROUPS  # query slice buffers
    num_warps: gl.constexpr = gl.num_warps()
    gl.static_assert(ROT_ROWS == SLICE_ and CH == _BLOCK_N and SLICE_ == 16 * num_warps and num_warps == 4)
    gl.static_assert(MID_N + TAIL_N <= CH)
    # the producer's schedule: round r + 1's slices start at box V_SLOTS_ of round r, one rotated per box after
    gl.static_assert(NKC >= V_SLOTS_ + 1 + _GROUPS and NS >= _GROUPS)
    q_buf = gl.allocate_shared_memory(q_desc.dtype, [QB, 1, SLICE_, 1, D], q_desc.layout)
    k_buf = gl.allocate_shared_memory(k_desc.dtype, [NKC, 1, CH, 1, D], k_desc.layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [V_SLOTS_, 1, CH, 1, D], v_desc.layout)
    q_loaded, q_ready, q_empty = _mbarriers(QB, 1), _mbarriers(QB, 1), _mbarriers(QB, 1)
    k_loaded, k_ready, kv_free = _mbarriers(NKC, 1), _mbarriers(NKC, 1), _mbarriers(NKC, _GROUPS)
    v_ready, v_empty = _mbarriers(V_SLOTS_, 1), _mbarriers(V_SLOTS_, _GROUPS)  # the ring: one V box, three readers
    fence_async_shared()
    _cta_barrier()

    bars = (q_loaded, q_ready, q_empty, k_loaded, k_ready, kv_free, v_ready, v_empty)
    sm_scale = 1.0 if ROPE and not SAVE_ROT else qk_scale  # without SAVE_ROT the rotation folds it into q
    gl.warp_specialize([
        (_stream_group, (q_buf, k_buf, v_ring, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS, N_FULL, MID_N,
                         TAIL_N, 0, OVERLAP_, num_warps)),
        (_stream_group, (q_buf, k_buf, v_ring, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS, N_FULL, MID_N,
                         TAIL_N, 1, OVERLAP_, num_warps)),
        (_stream_group, (q_buf, k_buf, v_ring, bars, o_desc, lse_ptr, H, N, n_heads, sm_scale, NS, N_FULL, MID_N,
                         TAIL_N, 2, OVERLAP_, num_warps)),
        (_stream_producer, (q_desc, k_desc, v_desc, qr_desc, kr_desc, q_buf, k_buf, v_ring, bars, cos_ptr, sin_ptr,
                            stab_h, stab_n, H, N, P, n_heads, qk_scale, NS, NKC, ROPE, SAVE_ROT)),
    ], [num_warps, num_warps, 4], _registers(OVERLAP_))
    _invalidate(q_loaded)
    _invalidate(q_ready)
    _invalidate(q_empty)
    _invalidate(k_loaded)
    _invalidate(k_ready)
    _invalidate(kv_free)
    _invalidate(v_ready)
    _invalidate(v_empty)
