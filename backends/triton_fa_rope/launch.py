"""The launcher of triton_fa_rope: compile-time parameters, grids, strides and the launches of one forward or
backward, with an explicit `ArchConfigs`.

`forward` and `backward` take `launch(kernel, grid, args, num_warps, num_stages, **constexprs)`, by default
`runtime.launch` (which runs the kernel); compiling ahead passes one that only compiles, the offline sm_90 check
one that records. The fused backward's launch is a `FusedBackward` plan, which a training forward makes ahead of
its backward (`plan_backward`).
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from attnhub import settings
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import configs, kernels
from attnhub.backends.triton_fa_rope.configs import INTERPRET, ArchConfigs
from attnhub.rope import CosSinTable, table_strides

LOG2E = 1.4426950408889634
ROT_M = 64  # rows per program of `rotate_kernel` (a pure load-rotate-store pass)
_ROT_META = ("HEAD_D", "BLOCK_D", "HEAD_D2", "BLOCK_D2", "PAIR_STEP", "PAIR_OFF", "SPLIT", "DOT")
MAX_PROGRAMS = 2**31 - 1  # launch-grid axis 0 limit; every kernel flattens (b, h, block) onto axis 0
PRE_M = 64  # rows per program of the split backward's delta pass
BOUNDS_BLOCK = 512  # mask entries per step of `key_bounds_kernel`

Launcher = Callable[..., object]


class Table(NamedTuple):
    """The parts of a `CosSinTable` the kernels read (the autograd's view of a table, whose cos and sin are its
    inputs); cos, sin: [N_grid, D/2], [H, N_grid, D/2] or [B, 1|H, N_grid, D/2]."""

    cos: torch.Tensor
    sin: torch.Tensor
    prefix_tokens: int
    layout: str
    source: CosSinTable | None = None  # the table of an inference call, for conversions kept on it (`gluon_fwd`)


def meta(q: torch.Tensor, rope: CosSinTable | None) -> dict:
    """Compile-time parameters shared by every kernel of one call."""
    return _meta_for(q.shape[-1], q.dtype, None if rope is None else rope.layout)


@functools.lru_cache(maxsize=None)
def _meta_for(D: int, dtype: torch.dtype, layout: str | None) -> dict:
    block_d = max(32, triton.next_power_of_2(D))  # tl.dot needs K >= 16, and pairs need BLOCK_D/2 >= 16
    dot = dot_dtype(dtype)
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


def dot_dtype(dtype: torch.dtype):
    """The dtype of tl.dot operands for inputs of `dtype`. float32 uses IEEE fp32 dots (not TF32), so every backend
    computes the same function to fp32 round-off; bf16 is upcast in the interpreter (triton-lang/triton#11584)."""
    if dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16):
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def rot_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved rotated q, k: the one the dots consumed, so the backward recomputes exactly the
    forward's scores."""
    return torch.float32 if dot_dtype(dtype) == tl.float32 else dtype


def _table_args(rope: CosSinTable | None, q: torch.Tensor):
    """(cos, sin, batch stride, head stride, row stride, prefix) for the kernels; a 1-element dummy without RoPE.

    rope: a `CosSinTable` (one `from_coords` is read as its materialised cos and sin) or a `Table`:
    cos, sin [N_grid, D/2], [H, N_grid, D/2] or [B, 1|H, N_grid, D/2], and prefix_tokens."""
    if rope is None:
        unread = dummy(q.device, torch.float32)
        return unread, unread, 0, 0, 0, 0
    cos, sin = rope.cos.detach(), rope.sin.detach()
    if cos.dtype != torch.float32:  # e.g. a bf16 table from a model cast to bf16: the kernels read fp32 angles
        cos, sin = cos.float(), sin.float()
    return cos, sin, *table_strides(cos), rope.prefix_tokens


@functools.lru_cache(maxsize=None)
def dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A 1-element tensor for a pointer argument the kernel does not read in this call (no table, no mask): one per
    device and dtype, kept, so that calls allocate none."""
    return torch.empty(1, device=device, dtype=dtype)


def _varlen_args(q, k, cos, key_padding_mask, launch: Launcher):
    """(mask, its bounds, its row stride, the constexprs GROUP, BATCHED_TABLE, KEY_MASK) of a call: the mask
    [B, N_KV] as uint8 and, per sample, its first masked key and one past its last valid key ([B, 2] int32, by
    `key_bounds_kernel`: the kernels run the key tiles before the first without the mask and skip those after the
    last; NaFlex batches pad at the end), 1-element dummies without a mask; H / H_kv query heads per k/v head, one
    table per sample."""
    if key_padding_mask is None:
        kpm = bounds = dummy(q.device, torch.uint8)
    else:
        kpm = key_padding_mask.contiguous().view(torch.uint8)
        bounds = torch.empty(kpm.shape[0], 2, device=kpm.device, dtype=torch.int32)
        launch(kernels.key_bounds_kernel, (kpm.shape[0],), (kpm, bounds, kpm.shape[1], kpm.stride(0)), 4, 1,
               BLOCK=BOUNDS_BLOCK)
    return kpm, bounds, kpm.stride(0), dict(GROUP=q.shape[1] // k.shape[1], BATCHED_TABLE=cos.dim() == 4,
                                            KEY_MASK=key_padding_mask is not None)


def grid(n_rows: int, block: int, bh: int) -> int:
    """Programs on launch-grid axis 0: ceil(n_rows / block) blocks of each of bh (batch, head) pairs."""
    programs = -(-n_rows // block) * bh  # triton.cdiv costs ~3 us of host time per call (a constexpr_function)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"triton_fa_rope: {programs} programs exceed the launch-grid limit {MAX_PROGRAMS}")
    return programs


def tail(n: int, block: int) -> int:
    """Width of the last, partial tile of n rows in blocks of `block`: a power of two >= 16 (tl.dot's minimum)."""
    rem = n % block
    return block if rem == 0 else min(block, max(16, 1 << (rem - 1).bit_length()))  # next power of two


def output_like(q: torch.Tensor) -> torch.Tensor:
    """o: [B, H, N, D] laid out as [B, N, H, D] in memory, so `o.transpose(1, 2).reshape(B, N, H*D)` is free."""
    B, H, N, D = q.shape
    return torch.empty(B, N, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)


def forward(q, k, v, rope, scale, save_rotated: bool, config: ArchConfigs, launch: Launcher | None = None,
            key_padding_mask: torch.Tensor | None = None):
    """q: [B, H, N, D], k, v: [B, H_kv, N_KV, D], key_padding_mask: bool [B, N_KV] or None -> o [B, H, N, D], lse
    [B*H, N] fp32 and, with save_rotated and RoPE, the rotated q [B, H, N, D] and k [B, H_kv, N, D] in joined pair
    order (else q and k themselves).

    Inference up to `config.resident_fwd_max_n` tokens takes the Gluon forward where it applies (`gluon_fwd`),
    training up to `config.resident_train_max_n` tokens too (it writes the rotated q and k in the order of its only
    layout, interleaved: joined pair order; from `config.gluon_prerotate_train_from_n` on the rotation pass writes
    them and the Gluon forward runs without RoPE, `_rotated_first`). Otherwise, with RoPE, from
    `config.prerotate_from_n` (inference) or `prerotate_train_from_n` (training) on, K (inference; q too from
    `config.prerotate_q_from_n`) or q and K (training) are rotated by `rotate_kernel` into a buffer before the
    attention kernel, not inside it."""
    launch = launch or runtime.launch
    B, H, N_Q, D = q.shape
    H_KV, N_KV = k.shape[1:3]
    resident = _resident_forward(config, N_Q, save_rotated)
    training = save_rotated and rope is not None
    if resident is not None and key_padding_mask is None:
        first = config.gluon_prerotate_train_from_n
        if training and first is not None and N_KV >= first:
            return _rotated_first(q, k, v, rope, scale, config, launch)
        out = resident.forward(q, k, v, rope, scale * LOG2E, launch, save_rotated,  # None: it cannot take the call now
                               config.gluon_options)
        if out is not None:
            return out
    cx = meta(q, rope)
    from_n = config.prerotate_train_from_n if training else config.prerotate_from_n
    prerotate = rope is not None and from_n is not None and N_KV >= from_n
    if training:
        cfg = (config.fwd_train_prerotated or config.fwd_train) if prerotate else config.fwd_train
    else:
        cfg = (config.fwd_prerotated or config.fwd) if prerotate else config.fwd
    o = output_like(q)
    lse = torch.empty(B * H, N_Q, device=q.device, dtype=torch.float32)
    cos, sin, stab_b, stab_h, stab_n, P = _table_args(rope, q)
    kpm, kbounds, smb, varlen = _varlen_args(q, k, cos, key_padding_mask, launch)
    rdtype = rot_dtype(q.dtype)
    qr, kr = (torch.empty(B, heads, N_Q, D, device=q.device, dtype=rdtype) if training else lse
              for heads in (H, H_KV))
    if training and not prerotate and varlen["KEY_MASK"]:  # the attention kernel skips the K tiles past the last
        kr.zero_()  # valid key, so it saves no rotated rows there: zeros, not stale memory, in the saved tensor
    q_in, k_in, rope_k, save_rot = q, k, True, training
    rotate_q = training or (config.prerotate_q_from_n is not None and N_KV >= config.prerotate_q_from_n)
    if prerotate:
        if not training:
            kr = torch.empty(B, H_KV, N_KV, D, device=q.device, dtype=rdtype)
            if rotate_q:
                qr = torch.empty(B, H, N_Q, D, device=q.device, dtype=rdtype)
        pairs = ((q, qr), (k, kr)) if rotate_q else ((k, kr),)
        rotation_pass(pairs, (cos, sin, stab_b, stab_h, stab_n, P), cx, varlen["BATCHED_TABLE"], launch)
        k_in, rope_k = kr, False
        if rotate_q:  # the attention kernel sees q and k already rotated: no RoPE, nothing more to save
            q_in, cx, save_rot = qr, _meta_for(D, q.dtype, None), False
    launch(kernels.fwd_kernel, (grid(N_Q, cfg.block_m, B * H),),
           (q_in, k_in, v, o, lse, cos, sin, qr, kr, kpm, kbounds, *q_in.stride(), *k_in.stride(), *v.stride(),
            *o.stride(), stab_b, stab_h, stab_n, smb, H, N_Q, N_KV, P, scale * LOG2E),
           cfg.num_warps, cfg.num_stages, **cfg.options(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
           SAVE_ROT=save_rot, ROPE_K=rope_k and cx["ROPE"],
           TAIL_N=tail(N_KV, cfg.block_n) if config.narrow_tail else cfg.block_n, **cx, **varlen)
    return o, lse, (qr, kr) if training else (q, k)


def _rotated_first(q, k, v, rope, scale: float, config: ArchConfigs, launch: Launcher):
    """A training call of `forward` after the rotation pass (`config.gluon_prerotate_train_from_n`): q and k rotated
    into qr, kr by `rotate_kernel`, then `forward`'s inference on them without RoPE: the Gluon forward (o and lse,
    no stores of rotated slices in its loop), or the Triton kernel where that cannot take the call now (compiling
    in the background, or a call it does not cover). -> o, lse, (qr, kr)."""
    rdtype = rot_dtype(q.dtype)
    qr = torch.empty(*q.shape, device=q.device, dtype=rdtype)
    kr = torch.empty(*k.shape, device=k.device, dtype=rdtype)
    table_args = _table_args(rope, q)
    rotation_pass(((q, qr), (k, kr)), table_args, meta(q, rope), table_args[0].dim() == 4, launch)
    o, lse, _ = forward(qr, kr, v, None, scale, False, config, launch)
    return o, lse, (qr, kr)


def rotation_pass(pairs, table_args, cx: dict, batched_table: bool, launch: Launcher, rows: int = ROT_M,
                  num_warps: int = 4) -> None:
    """`rotate_kernel` over pairs ((x, xr),) or ((q, qr), (k, kr)): x [B, H, N, D] (any strides) rotated into xr
    (contiguous [B, H, N, D]); with two pairs one launch, each program rotating the same rows of q and k (one table
    load; k may have fewer heads). table_args: `_table_args`'s; cx: `meta`'s."""
    (x, xr), (x2, xr2) = pairs[0], pairs[-1]
    cos, sin, stab_b, stab_h, stab_n, P = table_args
    B, H, N = x.shape[:3]
    launch(kernels.rotate_kernel, (grid(N, rows, B * H),),
           (x, x2, xr, xr2, cos, sin, *x.stride(), *x2.stride(), stab_b, stab_h, stab_n, H, x2.shape[1], N, P),
           num_warps, 1, BLOCK_M=rows, BATCHED_TABLE=batched_table, TWO=len(pairs) == 2,
           **{name: cx[name] for name in _ROT_META})


def _resident_forward(config: ArchConfigs, n: int, training: bool):
    """The `gluon_fwd` module when a call of length n may take it (config, Triton with Gluon), else None."""
    limit = min(config.resident_train_max_n, config.resident_fwd_max_n) if training else config.resident_fwd_max_n
    if not 0 < n <= limit or INTERPRET:
        return None
    return _gluon("gluon_fwd")


@functools.lru_cache(maxsize=None)
def _gluon(module: str):
    """attnhub.backends.triton_fa_rope.<module> (gluon_fwd or gluon_bwd), or None with a Triton without Gluon's
    Hopper API: then the Triton kernels serve every call."""
    try:
        return importlib.import_module(f"attnhub.backends.triton_fa_rope.{module}")
    except ImportError as exc:
        runtime.log.info("triton_fa_rope: no %s with triton %s (%s)", module, triton.__version__, exc)
        return None


def backward(do, q, k, v, o, lse, rope, scale, config: ArchConfigs, fused: bool, launch: Launcher | None = None,
             key_padding_mask: torch.Tensor | None = None, out: tuple | None = None,
             delta: torch.Tensor | None = None):
    """q, k: rotated (from `forward(save_rotated=True)`) with RoPE, else the inputs -> dq, dk, dv (dk, dv [B, H_kv,
    N_KV, D]: summed over the query heads of each k/v head), written into `out` (three tensors of those shapes, any
    strides, e.g. views of one projection's gradient) when given; delta: the split path's scratch like lse (None: it
    allocates one).

    Both paths are deterministic (no atomics). Split: three launches, `bwd_preprocess` (delta = rowsum(o * do)),
    `bwd_dkdv_kernel` (per BLOCK_N keys, over all queries) and `bwd_dq_kernel` (per BLOCK_M queries, recomputing the
    scores); from `config.gluon_bwd_from_n` tokens on the Gluon kernels of `gluon_bwd` replace the last two where they
    take the call, and with `config.delta_in_dq` its dQ kernel computes delta (no delta pass). Fused (`fused`): one
    launch, one program per (b, h), one pass over the scores; dq accumulates in registers when all queries fit one block
    (N_Q <= block_m: the short-sequence backward), else in an fp32 scratch [B*H, N_Q, D]. Without `out` the gradients
    are contiguous [B, H, N, D]: a fused qkv projection stacks them (`unbind`'s backward), and eager torch.stack is
    slower on [B, N, H, D]-laid ones (benchmarks/README.md)."""
    launch = launch or runtime.launch
    if fused:
        plan = FusedBackward(q, k, v, o, rope, scale, config, do.stride(),
                             None if out is None else tuple(t.stride() for t in out))
        return plan.run(do, q, k, v, o, lse, rope, out, launch)
    B, H, N_Q, D = q.shape
    N_KV = k.shape[2]
    cx = meta(q, rope)
    cos, sin, stab_b, stab_h, stab_n, P = _table_args(rope, q)
    kpm, kbounds, smb, varlen = _varlen_args(q, k, cos, key_padding_mask, launch)
    dq, dk, dv = out or (torch.empty(t.shape, device=t.device, dtype=v.dtype) for t in (q, k, v))
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    sizes = (H, N_Q, N_KV, P, scale * LOG2E, scale)
    delta = torch.empty_like(lse) if delta is None else delta
    gluon = _gluon_bwd(config, N_KV, key_padding_mask)
    plan = (None, None) if gluon is None else gluon.plan(q, k, v, do, o, dq, dk, dv, rope, cos, config)
    if plan[1] is None or not config.delta_in_dq:
        launch(kernels.bwd_preprocess, (grid(N_Q, PRE_M, B * H),), (o, do, delta, *o.stride(), *do.stride(), H, N_Q),
               4, 1, HEAD_D=D, BLOCK_D=cx["BLOCK_D"], BLOCK_M=PRE_M)
    for which in (1, 0):  # dQ first: it may compute delta for the dK/dV kernel
        if plan[which] is not None:
            gluon.run(plan, which, q, k, v, do, o, lse, delta, dq, dk, dv, cos, sin, scale * LOG2E, scale, launch)
    tables = (stab_b, stab_h, stab_n, smb)
    if plan[0] is None:
        cfg = config.dkdv
        launch(kernels.bwd_dkdv_kernel, (grid(N_KV, cfg.block_n, B * k.shape[1]),),
               (q, k, v, do, lse, delta, dk, dv, cos, sin, kpm, kbounds, *common, *dk.stride(), *dv.stride(),
                *tables, *sizes),
               cfg.num_warps, cfg.num_stages, **cfg.options(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **cx,
               **varlen)
    if plan[1] is None:
        cfg = config.dq
        launch(kernels.bwd_dq_kernel, (grid(N_Q, cfg.block_m, B * H),),
               (q, k, v, do, lse, delta, dq, cos, sin, kpm, kbounds, *common, *dq.stride(), *tables, *sizes),
               cfg.num_warps, cfg.num_stages, **cfg.options(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **cx,
               **varlen)
    return dq, dk, dv


class FusedBackward:
    """The fused backward's launch of one training call signature, planned by its forward (`plan_backward`) or by
    `backward`: the int arguments, grid and compile-time parameters, so that a run only allocates and launches.

    A cached training call's backward does `matches` and `run`, not `backward`'s planning: 28-44 µs of host time
    against 51-78 on H100 hosts' calling thread; the autograd engine's device thread, where the backward runs, adds
    20-30% to either (benchmarks/README.md, sessions 14 and 15)."""

    __slots__ = ("config", "path", "do_stride", "grad_strides", "shapes", "dtype", "device", "single", "lse_shape",
                 "grid", "ints", "table_as_is", "cfg", "constexprs")

    def __init__(self, q, k, v, o, rope, scale: float, config: ArchConfigs, do_stride: tuple,
                 grad_strides: tuple | None = None, path: str = "fused"):
        """q, k: as the forward saved them, v, o: [B, H, N, D]; do_stride: the incoming gradient's strides;
        grad_strides: dq, dk, dv's (None: contiguous, as `run` allocates them); path: the backward setting this plan
        was chosen under (`matches`)."""
        B, H, N_Q, D = q.shape
        shapes = tuple(t.shape for t in (q, k, v))
        self.config, self.path, self.do_stride = config, path, do_stride
        self.grad_strides = grad_strides or tuple(torch.empty(shape, device="meta").stride() for shape in shapes)
        self.shapes, self.dtype, self.device, self.lse_shape = shapes, v.dtype, q.device, (B * H, N_Q)
        self.cfg = cfg = config.bwd_fused
        self.single = N_Q <= cfg.block_m  # all queries in one block: delta and dq stay in registers, no scratch
        self.grid = (grid(1, 1, B * H),)
        self.table_as_is = rope is not None and rope.cos.dtype == torch.float32  # else `_table_args` per run
        _, _, _, stab_h, stab_n, P = _table_args(rope, q)
        self.ints = (*q.stride(), *k.stride(), *v.stride(), *do_stride, *o.stride(), *sum(self.grad_strides, ()),
                     stab_h, stab_n, H, N_Q, k.shape[2], P, scale * LOG2E, scale)
        self.constexprs = dict(**cfg.options(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_M=self.single,
                               **meta(q, rope))

    def scratch_like(self, lse: torch.Tensor) -> tuple:
        """-> delta [B*H, N_Q] and dq's accumulator [B*H, N_Q, D], fp32: the scratch of a run that is not `single`."""
        return torch.empty_like(lse), torch.empty(*self.lse_shape, self.shapes[0][-1], device=self.device,
                                                  dtype=torch.float32)

    def matches(self, do: torch.Tensor, out: tuple | None) -> bool:
        """Whether a backward with this incoming gradient (and `out`, see `backward`) runs as planned: do and out laid
        out as planned, the configs and the backward setting as at planning (`configs.override`,
        ATTNHUB_TRITON_BWD)."""
        return (laid_out(do, self.do_stride)
                and (out is None or all(laid_out(t, strides) for t, strides in zip(out, self.grad_strides)))
                and configs.for_call(self.device, self.shapes[0][-1]) is self.config
                and settings.triton_bwd() == self.path)

    def run(self, do, q, k, v, o, lse, rope, out: tuple | None = None, launch: Launcher | None = None,
            scratch: tuple | None = None):
        """-> dq, dk, dv (into `out` when given). The tensors as for `backward`, laid out as planned; scratch: delta
        and dq's fp32 accumulator where all queries do not fit one block (`scratch_like`), None to allocate them."""
        device = self.device
        # sizes as separate ints: torch.empty parses them in half the time of one tuple
        dq, dk, dv = out or (torch.empty(*shape, device=device, dtype=self.dtype) for shape in self.shapes)
        delta, dq_acc = (lse, lse) if self.single else scratch or self.scratch_like(lse)
        cos, sin = (rope.cos, rope.sin) if self.table_as_is else _table_args(rope, q)[:2]
        args = (q, k, v, o, do, lse, delta, dq_acc, dq, dk, dv, cos, sin, *self.ints)
        cfg = self.cfg
        if launch is None and runtime.aligned(q, k, v, do, cos, sin, *(out or ())):  # the rest: this call's allocations
            runtime.launch_keyed(self, kernels.bwd_fused_kernel, self.grid, args, cfg.num_warps, cfg.num_stages,
                                 **self.constexprs)
        else:
            (launch or runtime.launch)(kernels.bwd_fused_kernel, self.grid, args, cfg.num_warps, cfg.num_stages,
                                       **self.constexprs)
        return dq, dk, dv


_BACKWARD_PLANS: dict = {}  # training call signature -> FusedBackward, or None where the backward is not fused


def plan_backward(q, k, v, o, rope, scale: float, config: ArchConfigs, key_padding_mask,
                  grad_strides: tuple | None = None) -> FusedBackward | None:
    """The forward's plan of its backward (the tensors as `backward` takes them, the incoming gradient taken to be
    laid out like o, as compile-ahead takes it): a `FusedBackward` where the backward is fused, else None."""
    if key_padding_mask is not None:
        return None
    path = settings.triton_bwd()
    table = None if rope is None else (rope.layout, rope.cos.shape, rope.cos.stride(), rope.cos.dtype,
                                       rope.prefix_tokens)
    sig = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), o.stride(), q.dtype, v.dtype, q.device,
           table, scale, grad_strides, id(config), path)
    return runtime.remember(_BACKWARD_PLANS, sig, lambda: FusedBackward(q, k, v, o, rope, scale, config, o.stride(),
                                                                         grad_strides, path)
                            if use_fused_backward(config, q, k, rope, None, path) else None)


def packed_views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv: [B, N, 3, H, D] -> q, k, v: [B, H, N, D] views (as `attnhub.attention_packed` splits it)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def packed_strides(shape: torch.Size) -> tuple:
    """The strides of `packed_views` of a contiguous qkv of this shape (the packed backward's gradient)."""
    B, N, _, H, D = shape
    return ((N * 3 * H * D, D, 3 * H * D, 1),) * 3


def laid_out(t: torch.Tensor, strides: tuple) -> bool:
    """Whether t has these strides, those of its dimensions of size 1 aside (they address nothing: a kernel may be
    handed any stride there)."""
    got = t.stride()
    return got == strides or all(a == b or n == 1 for n, a, b in zip(t.shape, got, strides))


def _gluon_bwd(config: ArchConfigs, n_kv: int, key_padding_mask):
    """The `gluon_bwd` module when the split backward of a call with n_kv keys may take its kernels (config, no
    mask, Triton with Gluon), else None."""
    if config.gluon_bwd_from_n is None or n_kv < config.gluon_bwd_from_n or key_padding_mask is not None or INTERPRET:
        return None
    return _gluon("gluon_bwd")


def use_fused_backward(config: ArchConfigs, q, k, rope, key_padding_mask, path: str) -> bool:
    """Whether the backward of this call takes the fused path. `path` ("auto", "fused" or "split", from
    ATTNHUB_TRITON_BWD): auto takes it while max(N_Q, N_KV) <= config.bwd_fused_max_n, unless the split backward
    would run the Gluon kernels (from config.gluon_bwd_from_n on: faster on the GPU at N = 197). bwd_fused_kernel
    reads no key padding mask, k/v head groups or per-sample tables: those calls always take the split path."""
    if key_padding_mask is not None or k.shape[1] != q.shape[1] or (rope is not None and rope.cos.dim() == 4):
        return False
    if path == "auto":
        n = max(q.shape[2], k.shape[2])
        return n <= config.bwd_fused_max_n and not gluon_split(config, q, k, rope, n)
    return path == "fused"


def gluon_split(config: ArchConfigs, q, k, rope, n: int) -> bool:
    """Whether the split backward of a call would run the Gluon kernels (v and the output gradient taken to be laid
    out like k and q; when they are not, the split backward runs Triton's kernels)."""
    gluon = _gluon_bwd(config, n, None)
    return gluon is not None and gluon.takes(q, k, k, q, rope)


def compile_ahead(q, k, v, rope, scale, config: ArchConfigs, compile_one=None,
                  key_padding_mask: torch.Tensor | None = None) -> None:
    """Compile the kernels of a training forward and backward of this call's shapes, and their launchers, in
    parallel threads before the first launch (once per key; see `runtime.compile_ahead`).

    The backward is planned with o standing in for the incoming gradient (the same layout in the usual case;
    another layout compiles its own kernels at the backward, as without this)."""
    key = (q.device, q.dtype, q.shape, k.shape, q.stride(), k.stride(), v.stride(), key_padding_mask is None,
           None if rope is None else (rope.layout, rope.cos.shape[:-2], rope.prefix_tokens, rope.cos.dtype))
    def plan(launch: Launcher) -> None:
        fused = use_fused_backward(config, q, k, rope, key_padding_mask, settings.triton_bwd())
        o, lse, (q_saved, k_saved) = forward(q, k, v, rope, scale, True, config, launch, key_padding_mask)
        backward(o, q_saved, k_saved, v, o, lse, rope, scale, config, fused, launch, key_padding_mask)

    runtime.compile_ahead(key, q.device, plan, compile_one)
