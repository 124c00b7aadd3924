"""RoPE applied once by a Triton pass, then `F.scaled_dot_product_attention` (cuDNN on Hopper).

Rotating each token once costs one read and one write of q and k, whereas a fused kernel that rotates K inside its
tile loop re-rotates every K tile for every query block; at ViT lengths the separate pass plus PyTorch's fastest
attention kernel wins the forward (benchmarks/README.md; `measured.yaml` says where). Read top-down: the jit
kernel, the launcher, the autograd function and the `torch.compile` operator, the entry.

Forward: one launch rotates q and k (any strides in, e.g. views of a fused qkv projection; fp32 rotation math;
prefix tokens pass unchanged; both layouts; shared, per-head, per-sample or coordinate tables; k may have fewer
heads) into buffers laid out [B, N, H, D] in memory (the layout a qkv projection produces, which SDPA's kernels
read directly and mirror in o). Grouped heads and key padding go to SDPA's own arguments. Backward: SDPA's own
backward, then one launch applying R^T to dq and dk; the table's gradient (learnable frequencies) as in
`attnhub.rope.table_grad`.

Non-finite inputs: a query row holding an inf or NaN is written as an all-NaN rotated row, so the row of o is NaN
in every SDPA kernel (alone, SDPA returns 0 for a row whose scores are all -inf), as `math` defines it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attnhub.backends.torch_sdpa import sdpa
from attnhub.backends import _triton_runtime as runtime
from attnhub.rope import CosSinTable, table_grad, table_strides

_ROWS = 32  # tokens per program: 2 x 32 rows x D of q and k in flight, enough to saturate HBM at D = 64


@triton.jit
def _load_pairs(base, rows, rmask, mask, offs_j, sn, sd, BLOCK_D2: tl.constexpr, PAIR_STEP: tl.constexpr,
                PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr):
    """The rotary pairs (a, b) of x[rows, :] as two fp32 [ROWS, BLOCK_D2] tiles; rmask: [ROWS, 1] rows in range,
    mask: [ROWS, BLOCK_D2] also pairs in range."""
    if SPLIT:  # interleaved pairs, D a power of two: one coalesced row load, pairs separated in registers
        offs_d = tl.arange(0, 2 * BLOCK_D2)
        x = tl.load(base + rows * sn + offs_d[None, :] * sd, mask=rmask, other=0.0)
        xa, xb = tl.split(tl.reshape(x, [x.shape[0], BLOCK_D2, 2]))
    else:  # half layout: two contiguous halves; interleaved with D not a power of two: strided loads
        ptr = base + rows * sn + (offs_j * PAIR_STEP)[None, :] * sd
        xa = tl.load(ptr, mask=mask, other=0.0)
        xb = tl.load(ptr + PAIR_OFF * sd, mask=mask, other=0.0)
    return xa.to(tl.float32), xb.to(tl.float32)


@triton.jit
def _store_pairs(base, ya, yb, rows, rmask, mask, offs_j, sn, sd, BLOCK_D2: tl.constexpr, PAIR_STEP: tl.constexpr,
                 PAIR_OFF: tl.constexpr, SPLIT: tl.constexpr):
    ty = base.dtype.element_ty
    if SPLIT:
        offs_d = tl.arange(0, 2 * BLOCK_D2)
        y = tl.reshape(tl.join(ya, yb), [ya.shape[0], 2 * BLOCK_D2])
        tl.store(base + rows * sn + offs_d[None, :] * sd, y.to(ty), mask=rmask)
    else:
        ptr = base + rows * sn + (offs_j * PAIR_STEP)[None, :] * sd
        tl.store(ptr, ya.to(ty), mask=mask)
        tl.store(ptr + PAIR_OFF * sd, yb.to(ty), mask=mask)


@triton.jit
def _rotate_kernel(
    X1, X2, Y1, Y2, COS, SIN,
    sx1b, sx1h, sx1n, sx1d, sx2b, sx2h, sx2n, sx2d,
    sy1b, sy1h, sy1n, sy1d, sy2b, sy2h, sy2n, sy2d,
    stab_b, stab_h, stab_n, H, H2, N, P,
    HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr, PAIR_STEP: tl.constexpr, PAIR_OFF: tl.constexpr,
    SPLIT: tl.constexpr, SIGN: tl.constexpr, NAN_ROWS: tl.constexpr, ROWS: tl.constexpr, COORDS: tl.constexpr,
):
    """Y1 = R X1, Y2 = R X2 (SIGN = 1) or R^T (SIGN = -1) for ROWS tokens of one (b, h); X1, Y1: [B, H, N, D],
    X2, Y2: [B, H2, N, D] (H2 <= H: grouped k/v heads; heads h >= H2 only rotate X1), any strides. A pair (a, b)
    turns to (a c - b s, b c + a s); prefix tokens (n < P) are copied. COS, SIN: the tables; with COORDS instead
    coords [(B,) N_grid, 2] (y, x) and freqs [(H,) D/2, 2], contiguous fp32, and pair j's angle y * freqs[j, 0] +
    x * freqs[j, 1] computed here in fp32 (no table in memory); the strides are then those of coords (batch, row)
    and of freqs (head)."""
    n_blocks = tl.cdiv(N, ROWS)
    pid = tl.program_id(0)
    bh = pid // n_blocks
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_n = (pid % n_blocks) * ROWS + tl.arange(0, ROWS)
    offs_j = tl.arange(0, BLOCK_D2)
    rmask = (offs_n < N)[:, None]
    mask = rmask & (offs_j < HEAD_D2)[None, :]
    t = offs_n - P
    tmask = mask & (t >= 0)[:, None]
    if COORDS:
        tok = COS + b * stab_b + t * stab_n  # coords of each token: [ROWS]
        tok_ok = (offs_n < N) & (t >= 0)
        y = tl.load(tok, mask=tok_ok, other=0.0)
        x = tl.load(tok + 1, mask=tok_ok, other=0.0)
        f = SIN + h * stab_h + offs_j * 2
        fy = tl.load(f, mask=offs_j < HEAD_D2, other=0.0)
        fx = tl.load(f + 1, mask=offs_j < HEAD_D2, other=0.0)
        angle = y[:, None] * fy[None, :] + x[:, None] * fx[None, :]
        c = tl.where(tmask, tl.cos(angle), 1.0)
        s = tl.where(tmask, tl.sin(angle), 0.0) * SIGN
    else:
        tab = b * stab_b + h * stab_h + t[:, None] * stab_n + offs_j[None, :]
        c = tl.load(COS + tab, mask=tmask, other=1.0).to(tl.float32)
        s = tl.load(SIN + tab, mask=tmask, other=0.0).to(tl.float32) * SIGN
    rows = offs_n[:, None].to(tl.int64)

    xa, xb = _load_pairs(X1 + b * sx1b + h * sx1h, rows, rmask, mask, offs_j, sx1n, sx1d, BLOCK_D2, PAIR_STEP,
                         PAIR_OFF, SPLIT)
    ya, yb = xa * c - xb * s, xb * c + xa * s
    if NAN_ROWS:  # x - x is NaN exactly where x is inf or NaN
        bad = tl.max(((xa - xa) != 0).to(tl.int32) + ((xb - xb) != 0).to(tl.int32), axis=1) > 0
        ya = tl.where(bad[:, None], float("nan"), ya)
        yb = tl.where(bad[:, None], float("nan"), yb)
    _store_pairs(Y1 + b * sy1b + h * sy1h, ya, yb, rows, rmask, mask, offs_j, sy1n, sy1d, BLOCK_D2, PAIR_STEP,
                 PAIR_OFF, SPLIT)
    if h < H2:
        xa, xb = _load_pairs(X2 + b * sx2b + h * sx2h, rows, rmask, mask, offs_j, sx2n, sx2d, BLOCK_D2, PAIR_STEP,
                             PAIR_OFF, SPLIT)
        _store_pairs(Y2 + b * sy2b + h * sy2h, xa * c - xb * s, xb * c + xa * s, rows, rmask, mask, offs_j, sy2n,
                     sy2d, BLOCK_D2, PAIR_STEP, PAIR_OFF, SPLIT)


# --------------------------------------------------------------------------------------------------- launcher
_MAX_PROGRAMS = 2**31 - 1  # launch-grid axis 0 limit; (b, h, block of rows) is flattened onto axis 0


def _bnhd_like(x: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, N, D] tensor laid out [B, N, H, D] in memory (what a qkv projection gives SDPA)."""
    B, H, N, D = x.shape
    return torch.empty(B, N, H, D, device=x.device, dtype=x.dtype).transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _meta(D: int, layout: str) -> dict:
    interleaved = layout == "interleaved"
    block_d2 = triton.next_power_of_2(D // 2)
    return dict(HEAD_D2=D // 2, BLOCK_D2=block_d2, PAIR_STEP=2 if interleaved else 1,
                PAIR_OFF=1 if interleaved else D // 2, SPLIT=interleaved and block_d2 == D // 2)


def _rotate(x1: torch.Tensor, x2: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefix: int, layout: str,
            inverse: bool, coords: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(R x1, R x2), or (R^T x1, R^T x2) with `inverse`; x1: [B, H, N, D], x2: [B, H_kv, N, D] -> the same shapes
    laid out [B, N, H, D] in memory.

    cos, sin: [N - prefix, D/2], [H, N - prefix, D/2] or [B, 1|H, N - prefix, D/2] (one table per sample); with
    `coords`, the coords [(B,) N - prefix, 2] and freqs [(H,) D/2, 2] of a `from_coords` table instead. The forward
    rotation NaN-fills non-finite rows of x1 (q).
    """
    B, H, N, D = x1.shape
    y1, y2 = _bnhd_like(x1), _bnhd_like(x2)
    cos, sin = cos.detach(), sin.detach()
    if cos.dtype != torch.float32:  # e.g. a bf16 table of a model cast to bf16: the rotation reads fp32 angles
        cos, sin = cos.float(), sin.float()
    if coords:
        cos, sin = cos.contiguous(), sin.contiguous()
        strides = (cos.stride(0) if cos.dim() == 3 else 0, sin.stride(0) if sin.dim() == 3 else 0, cos.stride(-2))
    else:
        strides = table_strides(cos)
    programs = -(-N // _ROWS) * B * H
    if programs > _MAX_PROGRAMS:
        raise ValueError(f"triton_rope_sdpa: {programs} programs exceed the launch-grid limit {_MAX_PROGRAMS}")
    # the fused backend's launcher: it keeps each compiled kernel, so a cached launch skips Triton's argument binding
    runtime.launch(
        _rotate_kernel, (programs,),
        (x1, x2, y1, y2, cos, sin, *x1.stride(), *x2.stride(), *y1.stride(), *y2.stride(),
         *strides, H, x2.shape[1], N, prefix),
        4, 1, SIGN=-1 if inverse else 1, NAN_ROWS=not inverse, ROWS=_ROWS, COORDS=coords, **_meta(D, layout),
    )
    return y1, y2


# --------------------------------------------------------------------------------------------------- autograd
class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, rope, coords):
        """cos, sin: the table, or with `coords` the coords and freqs of a table that needs no gradient."""
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:  # the table's gradient needs the unrotated q, k
            ctx.save_for_backward(q, k)
        ctx.rope, ctx.table, ctx.coords = rope, (cos.detach(), sin.detach()), coords
        return _rotate(q, k, cos, sin, rope.prefix_tokens, rope.layout, inverse=False, coords=coords)

    @staticmethod
    def backward(ctx, dqr, dkr):
        rope, (cos, sin) = ctx.rope, ctx.table
        dq, dk = _rotate(dqr, dkr, cos, sin, rope.prefix_tokens, rope.layout, inverse=True, coords=ctx.coords)
        dcos = dsin = None
        if ctx.saved_tensors:
            dcos, dsin = table_grad(cos, sin, rope.prefix_tokens, rope.layout, *ctx.saved_tensors, dq, dk)
        return dq, dk, dcos, dsin, None, None


# Inside torch.compile the rotation runs as a custom operator, opaque to the compiler; eager calls skip the
# operator layer (tens of microseconds of host time per call).
@torch.library.custom_op("attnhub::rope_rotate", mutates_args=())
def _rotate_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefix: int, layout: str,
               inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, cos, sin, prefix, layout, inverse)


@_rotate_op.register_fake
def _(q, k, cos, sin, prefix, layout, inverse):
    return _bnhd_like(q), _bnhd_like(k)


def _op_setup_context(ctx, inputs, output):
    q, k, cos, sin, prefix, layout, _ = inputs
    table_needs_grad = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, *((q, k) if table_needs_grad else ()))
    ctx.prefix, ctx.layout = prefix, layout


def _op_backward(ctx, dqr, dkr):
    cos, sin, *unrotated = ctx.saved_tensors
    dq, dk = _rotate_op(dqr, dkr, cos, sin, ctx.prefix, ctx.layout, True)
    dcos = dsin = None
    if unrotated:
        dcos, dsin = table_grad(cos, sin, ctx.prefix, ctx.layout, *unrotated, dq, dk)
    return dq, dk, dcos, dsin, None, None, None


_rotate_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ------------------------------------------------------------------------------------------------------ entry
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: CosSinTable | None, scale: float, *,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [B, H, N, D], k, v: [B, H_kv, N, D], rope: a table (the registry admits no call without one),
    key_padding_mask: bool [B, N] -> o: [B, H, N, D] in q's dtype (memory layout [B, N, H, D] where SDPA's kernel
    mirrors its inputs). Grouped heads and the mask go to SDPA's own arguments (`torch_sdpa.sdpa`)."""
    if torch.compiler.is_compiling():
        cos, sin = rope.cos_sin()
        qr, kr = _rotate_op(q, k, cos, sin, rope.prefix_tokens, rope.layout, False)
    elif rope.coords is not None and not rope.requires_grad:  # angles from coords inside the kernel: no table
        qr, kr = _Rotate.apply(q, k, rope.coords, rope.freqs, rope, True)
    else:  # a learnable from_coords table computes its angles here, in autograd
        qr, kr = _Rotate.apply(q, k, *rope.cos_sin(), rope, False)
    return sdpa(qr, kr, v, scale, key_padding_mask)
