"""The Hopper forwards of triton_fa_rope at ViT lengths (N <= 1152), written in Gluon
(`triton.experimental.gluon`, kernels in `gluon_kernels`, `gluon_long_kernels` and `gluon_stream_kernels`): K of a
head resident in shared memory (up to 640 tokens V too), RoPE applied once per token. This module plans and
launches them.

The Triton forward rotates every K tile inside its tile loop, once per query block (35-45% of its time at
N = 197), and stock Triton's loop reaches 0.6x of cuDNN there. These kernels take the structure of TensorRT-LLM's
length-specialised fmha_v2 kernels: one persistent CTA loops over (b, h) heads, K is rotated once in shared memory
and Q once with scale * log2(e) folded in (fp32 math from fp16 tables with bf16 inputs, `_tables`; rounded to the
input dtype, as a rotation pass would), and each warpgroup runs S = Q K^T over 64-key chunks with an online
softmax, P staying in registers as wgmma's A operand. TMA reads 4-D descriptors over [B, N, H, D]: rows past N
arrive as zeros, no other sample is read. `resident_fwd_kernel` serves N <= 256 (Q, K and V of a head whole, the
next head's loads in flight; as Hopper's table has it (`resident_warp_specialized`), `resident_ws_fwd_kernel`: a
warpgroup loads and rotates the next head while two attend this one), `long_fwd_kernel` 256 < N <= 640
(warp-specialized: a producer warpgroup loads and rotates K/V boxes and query slices; as Hopper's table has it
(`long_attend_groups` = 3), three warpgroups attend as partitions of their own on 64-row slices, handing the K/V
boxes back box by box (`long_early_release`); with 0, two warpgroups attend 128-row slices as one partition; with
`long_swap_tail` a last slice of at most 16 rows runs with the keys as the MMA's rows); `stream_fwd_kernel` 640 < N
<= 1152 (K resident, V through a ring of boxes, three attending warpgroups on a round of three 64-row slices at a
time).

Only `launch.forward` calls them, for the calls they can take (`eligible`): no key padding mask, equal head counts,
interleaved RoPE with one table (or one per head) or none, bf16/fp16, D = 64, N_Q = N_KV <= 1152, TMA-aligned
strides; inference up to the config table's `resident_fwd_max_n`, training up to its `resident_train_max_n`. For
training (SAVE_ROT) Q is rotated without the scale (applied to S instead) and the rotated Q and K leave shared memory
by TMA stores beside the attention, so the backward kernels read them as they read the Triton forward's. Gluon has
no interpreter: the GPU parity tests and an offline sm_90 compile check cover them
(tests/backends/triton_fa_rope/test_gluon_fwd.py, test_sm90.py; the streaming kernel's schedule also on a model,
test_stream_schedule.py). Measured on an H200 (the streaming kernel on an H100): benchmarks/README.md.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope.configs import GluonOptions
from attnhub.backends.triton_fa_rope.gluon_kernels import (BLOCK_N, WS_ROT_ROWS, resident_fwd_kernel,
                                                             resident_ws_fwd_kernel)
from attnhub.backends.triton_fa_rope.gluon_kernels import WS_MAXNREG as RESIDENT_WS_MAXNREG
from attnhub.backends.triton_fa_rope.gluon_long_kernels import WS_3_GROUPS_MAXNREG, WS_MAXNREG, long_fwd_kernel
from attnhub.backends.triton_fa_rope.gluon_stream_kernels import MAXNREG as STREAM_MAXNREG
from attnhub.backends.triton_fa_rope.gluon_stream_kernels import GROUPS, stream_fwd_kernel
from attnhub.rope import CosSinTable, table_strides

RESIDENT_MAX_N = 256  # Q, K and V of a head (256 x 64 bf16 each) fit shared memory twice (double-buffered): 192 KiB
LONG_MIN_N = 128  # the long kernel's slice loop needs two whole key chunks (`_attend_slice`)
SLICE = 128  # longer sequences: query rows per step (`long_fwd_kernel`; K and V in boxes of BLOCK_N rows)
GROUP_SLICE = 64  # ... per step of one attending group (`long_fwd_kernel`'s ATTEND_GROUPS)
TAIL_ROWS = 16  # the swapped last slice's query columns (`long_fwd_kernel`'s TAIL_Q): wgmma's N in steps of 8
MAX_N = 640  # the long kernel: K and V in ten 64-row boxes each and six 64-row query buffers: 208 KiB
STREAM_MAX_N = 1152  # the streaming kernel: 18 K boxes, six query buffers and four V boxes: 224 KiB
SHARED_BYTES = 227 * 1024 - 1024  # a Hopper block's shared memory, less room for the barriers
HEAD_D = 64
NUM_WARPS = 8  # two warpgroups, each 2 x 64 query rows: within 1% of the best of six structures at N = 197
ROT_ROWS = 128  # tokens per RoPE step, the next step's table load in flight (on an H200 faster than 32 or 64)


# ---------------------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def chunking(N: int, rot_rows: int = ROT_ROWS) -> dict:
    """Keys: N_FULL unmasked chunks of BLOCK_N, one unmasked chunk of BLOCK_N / 2 (or none), one masked chunk as
    narrow as the rest allows (a power of two >= 16, or none): 197 = 3 * 64 + 5 -> 3 chunks and a 16-key tail.
    RoPE: ROT_CHUNKS steps of rot_rows tokens cover the N rows (a multiple of `_rot_layout`'s 32 rows); in
    `long_fwd_kernel` (rot_rows = SLICE) they are its query slices (its K/V boxes: one per chunk of BLOCK_N)."""
    n_full, rest = divmod(N, BLOCK_N)
    mid = BLOCK_N // 2 if rest >= BLOCK_N // 2 else 0
    rest -= mid
    return dict(N_FULL=n_full, MID_N=mid, TAIL_N=0 if rest == 0 else max(16, triton.next_power_of_2(rest)),
                ROT_ROWS=rot_rows, ROT_CHUNKS=-(-N // rot_rows))


@functools.lru_cache(maxsize=None)
def stream_v_slots(N: int, asked: int) -> int:
    """V boxes in the streaming kernel's ring at N tokens: `asked` (the config table's `stream_v_slots`), or as many
    as fit beside K's boxes and the groups' query buffers (two each) where fewer do (5 only up to 1088 tokens)."""
    box = BLOCK_N * HEAD_D * 2  # bf16 / fp16; a query slice is as large
    return min(asked, SHARED_BYTES // box - 2 * GROUPS - -(-N // BLOCK_N))


@functools.lru_cache(maxsize=None)
def block_rows(N: int) -> int:
    """Rows of `resident_fwd_kernel`'s Q, K, V blocks in shared memory: N rounded up to a power of two, at least 16
    rows per warp."""
    return max(16 * NUM_WARPS, triton.next_power_of_2(N))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _smem_layout(block: int, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for([1, block, 1, HEAD_D], gl.bfloat16 if dtype == torch.bfloat16
                                                else gl.float16)


def _tma_strides(x: torch.Tensor) -> bool:
    """x: [B, H, N, D]; whether TMA can read it as [B, N, H, D] at a 16-byte aligned base: 16-byte strides,
    channels dense."""
    s0, s1, s2, s3 = x.stride()
    per_16_bytes = 16 // x.element_size()
    return s3 == 1 and s0 % per_16_bytes == 0 and s1 % per_16_bytes == 0 and s2 % per_16_bytes == 0


def _maker(t: torch.Tensor, rows: int):
    """Descriptors of tensors like t [B, H, N, D]: TMA reads the [B, N, H, D] tensor it is in memory (from its
    base), in blocks of `rows` (`runtime.descriptor_maker`: checked once, copied per call)."""
    B, H, N, D = t.shape
    s = t.stride()
    return runtime.descriptor_maker(TensorDescriptor, t, [B, N, H, D], [s[0], s[2], s[1], s[3]], [1, rows, 1, D],
                                    _smem_layout(rows, t.dtype))


class _Plan:
    """What one call signature (shapes, strides, dtypes, device, table, whether to save the rotated q and k) fixes
    of a launch: the kernel (by length), the descriptor makers of q, k, v, o (and of the rotated q, k: contiguous
    [B, H, N, D]), the grid, the int arguments and constexprs, and the kept runner's key (with the table's
    alignment and the scale, which stay per call). Identity-hashed: a plan is its own key. long: the long kernel
    (`_takes_long`; past MAX_N tokens the streaming one, which takes none of the switches); early_release: its K/V
    boxes handed back box by box in a head's last slice (`long_fwd_kernel`'s EARLY_RELEASE); groups: its attending
    partitions (ATTEND_GROUPS; 0: one of NUM_WARPS warps); tail_q: rows of its swapped last query slice (TAIL_Q; 0:
    none); v_slots: the streaming kernel's V ring (`stream_v_slots`), overlap: its groups' key loop
    (`stream_overlap`); ws: the resident kernel's warp-specialized form (`resident_ws_fwd_kernel`)."""

    __slots__ = ("kernel", "make_q", "make_k", "make_v", "make_o", "make_rot", "o_shape", "lse_shape", "grid",
                 "ints", "constexprs", "num_warps", "s_scale_one")

    def __init__(self, q, k, v, rope, cos, device, save_rotated: bool, long: bool, early_release: bool,
                 groups: int, tail_q: int, v_slots: int, overlap: bool, ws: bool):
        B, H, N, D = q.shape
        stream = N > MAX_N  # K resident, V streamed: three attending groups (the options do not apply)
        self.kernel = (stream_fwd_kernel if stream else long_fwd_kernel if long else resident_ws_fwd_kernel if ws
                       else resident_fwd_kernel)
        slice_rows = GROUP_SLICE if groups or stream else SLICE
        q_rows, kv_rows = (slice_rows, BLOCK_N) if long else (block_rows(N),) * 2  # TMA boxes [1, rows, 1, D]
        self.num_warps = 4 if groups or stream else NUM_WARPS  # with groups: the default partition, group 0

        self.o_shape, self.lse_shape = (B, N, H, D), (B * H, N)
        o = torch.empty(*self.o_shape, device=device, dtype=q.dtype).transpose(1, 2)
        self.make_q, self.make_o = _maker(q, q_rows), _maker(o, q_rows)
        self.make_k, self.make_v = _maker(k, kv_rows), _maker(v, kv_rows)
        self.make_rot = None
        if save_rotated:  # contiguous [B, H, N, D], as `forward` allocates them
            rot = torch.empty(*q.shape, device=device, dtype=q.dtype)
            self.make_rot = _maker(rot, q_rows), _maker(rot, kv_rows)
        stab_h, stab_n = (0, 0) if rope is None else table_strides(cos)[1:]
        n_heads = B * H
        self.grid = (min(n_heads, _num_sms(device.index)) if device.type == "cuda" else n_heads,)  # CPU: recorded
        self.ints = (stab_h, stab_n, H, N, 0 if rope is None else rope.prefix_tokens, n_heads)
        self.constexprs = dict(ROPE=rope is not None, SAVE_ROT=save_rotated,
                               **chunking(N, slice_rows if long else WS_ROT_ROWS if ws else ROT_ROWS))
        if stream:
            self.constexprs.update(V_SLOTS_=v_slots, OVERLAP_=overlap, maxnreg=STREAM_MAXNREG)
        elif long:
            self.constexprs.update(EARLY_RELEASE=early_release, ATTEND_GROUPS=groups, TAIL_Q=tail_q,
                                   maxnreg=WS_3_GROUPS_MAXNREG if groups else WS_MAXNREG)
        elif ws:
            self.constexprs.update(maxnreg=RESIDENT_WS_MAXNREG)
        # the warp-specialized resident kernel takes the scale of S as an argument: 1.0 where q carries it
        self.s_scale_one = None if not ws else rope is not None and not save_rotated


_PLANS: dict = {}  # call signature -> _Plan or None (`runtime.remember`)


def _plan(q, k, v, rope, cos, save_rotated: bool = False,
          options: GluonOptions = GluonOptions()) -> _Plan | None:
    """The plan of this call's signature, or None when the kernel cannot take it: q, k, v [B, H, N, D] alike in
    shape and dtype (bf16 or fp16), D = 64, 0 < N <= STREAM_MAX_N, TMA-readable strides; rope None or interleaved
    with one table or one per head. cos: the table as the kernel reads it (`_tables`); save_rotated: write the
    rotated q and k (only with rope); options: the long kernels' switches (`forward`)."""
    rope_sig = None if rope is None else (rope.layout, cos.shape, cos.stride(), cos.dtype, rope.prefix_tokens)
    save = save_rotated and rope is not None
    N = q.shape[2]
    long = _takes_long(N, options.from_n)
    stream = MAX_N < N <= STREAM_MAX_N  # past it: no plan (`_takes`)
    v_slots, overlap = (stream_v_slots(N, options.v_slots), options.overlap) if stream else (0, False)
    if N > MAX_N:  # the long kernel's switches do not apply
        options = GluonOptions()
    # every group needs a slice of each head (N > 64 * (groups - 1)); the long kernel's N >= 128 gives it for 2
    groups = options.attend_groups if long and N > GROUP_SLICE * (options.attend_groups - 1) else 0
    # one query slice has no last slice apart from its first (with groups each has its own last slice)
    early = options.early_release and long and (N > SLICE or groups > 0)
    tail_q = TAIL_ROWS if options.swap_tail and groups and 0 < N % GROUP_SLICE <= TAIL_ROWS else 0
    ws = options.resident_ws and not long and N <= RESIDENT_MAX_N
    sig = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device,
           rope_sig, save, long, early, groups, tail_q, v_slots, overlap, ws)
    return runtime.remember(_PLANS, sig, lambda: _Plan(q, k, v, rope, cos, q.device, save, long, early, groups,
                                                       tail_q, v_slots, overlap, ws)
                            if _takes(q, k, v, rope) else None)


def _takes_long(n: int, long_from_n: int) -> bool:
    """Whether a call of n tokens takes the long kernel: past the resident kernel's limit always, from long_from_n
    (at least `LONG_MIN_N`) on as well."""
    return n > RESIDENT_MAX_N or n >= max(long_from_n, LONG_MIN_N)


def _takes(q, k, v, rope) -> bool:
    B, H, N, D = q.shape
    if q.dtype not in (torch.bfloat16, torch.float16) or not k.dtype == v.dtype == q.dtype:
        return False
    if D != HEAD_D or not 0 < N <= STREAM_MAX_N or k.shape != q.shape or v.shape != q.shape:
        return False
    if rope is not None and (rope.layout != "interleaved" or rope.cos.dim() == 4):
        return False
    return all(_tma_strides(t) for t in (q, k, v))


def _tables(rope, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin as the kernel reads them (it computes in fp32): fp16 with bf16 inputs, kept on the `CosSinTable`
    (entries in [-1, 1] round by at most 2^-12, an eighth of bf16's rounding of q and k; fewer table bytes per
    head, 3% faster at ViT-S on an H200); else fp32 (a table of a model cast to bf16 is read as its fp32 copy)."""
    source = rope if isinstance(rope, CosSinTable) else rope.source
    if dtype == torch.bfloat16 and source is not None:
        return source.cos_sin_as(torch.float16)
    fp32 = lambda t: t.detach() if t.dtype == torch.float32 else t.detach().float()  # noqa: E731
    return fp32(rope.cos), fp32(rope.sin)


def eligible(q, k, v, rope, key_padding_mask) -> bool:
    """Whether `forward` takes this call: no key padding mask, and a signature `_plan` accepts with 16-byte aligned
    q, k, v."""
    if key_padding_mask is not None:
        return False
    cos = None if rope is None else _tables(rope, q.dtype)[0]
    return runtime.aligned(q, k, v) and _plan(q, k, v, rope, cos) is not None


def forward(q, k, v, rope, qk_scale: float, launch, save_rotated: bool = False,
            options: GluonOptions = GluonOptions()):
    """q, k, v: [B, H, N, D], rope: a table with cos, sin [N - P, D/2] or [H, N - P, D/2], or None ->
    o [B, H, N, D] laid out [B, N, H, D], lse [B*H, N] fp32 (base 2) and, with save_rotated and rope, the rotated
    q and k [B, H, N, D] (contiguous, q's dtype; else q and k themselves); None when the kernel cannot take the call
    (`eligible`, given a call without a mask) or while its kernel compiles in the background (`runtime.compiling`:
    the Triton forward serves those calls). qk_scale: scale * log2(e); options: the long kernels' switches from
    the config table (`ArchConfigs.gluon_options`; its from_n: the long kernel from that length on, the resident one
    serving up to `RESIDENT_MAX_N` tokens, the long one from `LONG_MIN_N`; attend_groups: one of
    `configs.LONG_ATTEND_GROUPS`, groups with early_release, as `ArchConfigs` checks them; v_slots, overlap: the
    streaming kernel's V ring and key loop past `MAX_N` tokens, `stream_v_slots`, `stream_overlap`)."""
    cos, sin = (None, None) if rope is None else _tables(rope, q.dtype)
    # a plan is built from aligned tensors
    plan = _plan(q, k, v, rope, cos, save_rotated, options) if runtime.aligned(q, k, v) else None
    if plan is None:
        return None
    # sizes as separate ints: torch.empty parses them in half the time of one tuple (a cached call's host time)
    o = torch.empty(*plan.o_shape, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(*plan.lse_shape, device=q.device, dtype=torch.float32)
    if rope is None:
        cos = sin = lse  # not read
    q_desc, k_desc = plan.make_q(q), plan.make_k(k)
    if plan.make_rot is None:
        rotated, rot_descs = (q, k), (q_desc, k_desc)  # not written
    else:
        rotated = (torch.empty(*q.shape, device=q.device, dtype=q.dtype),
                   torch.empty(*k.shape, device=k.device, dtype=k.dtype))
        rot_descs = (plan.make_rot[0](rotated[0]), plan.make_rot[1](rotated[1]))
    args = (q_desc, k_desc, plan.make_v(v), plan.make_o(o), *rot_descs, lse, cos, sin, *plan.ints, qk_scale)
    if plan.s_scale_one is not None:
        args += (1.0 if plan.s_scale_one else qk_scale,)
    # the plan knows every argument's specialization but the table's alignment
    spec = (plan, cos.data_ptr() % 16 == 0, sin.data_ptr() % 16 == 0)
    if runtime.compiling(spec, launch, plan.kernel, plan.grid, args, plan.num_warps, 1, **plan.constexprs):
        return None  # the Triton forward serves the call
    if launch is runtime.launch:
        runtime.launch_keyed((*spec, qk_scale), plan.kernel, plan.grid, args, plan.num_warps, 1, **plan.constexprs)
    else:
        launch(plan.kernel, plan.grid, args, plan.num_warps, 1, **plan.constexprs)
    return o, lse, rotated
