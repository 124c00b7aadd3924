"""Gradients of triton_fa_rope: the `autograd.Function` of eager calls, the torch.compile custom operators, and the
entry `attention` the registry points to.

Both paths run the same `launch.forward` / `launch.backward` and keep what the backward needs with one pair of
helpers, `_save` / `_saved`. Eager calls skip the operator layer: it costs tens of microseconds of host time per
call. Their forward also plans a fused backward (`launch.plan_backward`), so that a backward that matches the plan
only allocates and launches (on the autograd engine's device thread, where Python costs 20-30% more); from a
signature's second call on, `replay` runs both from C++ where it can, one call each (`ReplayedAttention`;
ATTNHUB_TRITON_REPLAY=0 turns it off). Inside
torch.compile the kernels run as custom operators, opaque to the compiler (fake implementations give it shapes and
strides); `attention_packed`, where the Gluon backward kernels serve it, as operators of the projection qkv, whose
backward returns its gradient whole.

Training: the forward also returns the rotated q and k it computed, so the backward kernels need no rotation. A
table that requires grad (learnable frequencies, RoPE-Mixed) gets its gradient from `_table_grad`, in PyTorch after
the backward kernels, from the unrotated q, k (then saved as well) and their gradients; a table built
`from_coords` is read as its materialised cos and sin, so that gradient reaches coords and freqs through autograd.
A key padding mask travels with the saved tensors to the backward kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from attnhub import settings
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import configs, launch, replay
from attnhub.backends.triton_fa_rope.launch import Table
from attnhub.rope import CosSinTable, table_grad


def _table_grad(table: Table, q, k, dq, dk) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. table.cos and table.sin from the unrotated q, k and the kernels' dq, dk."""
    return table_grad(table.cos, table.sin, table.prefix_tokens, table.layout, q, k, dq, dk)


def _save(ctx, q, k, v, table: Table | None, scale: float, o, lse, q_saved, k_saved, mask) -> None:
    """Keep what the backward needs: q_saved, k_saved (rotated with RoPE), v, o, lse, the key padding mask, the
    table and, when the table requires grad, the unrotated q and k."""
    table_grad = table is not None and (table.cos.requires_grad or table.sin.requires_grad)
    ctx.save_for_backward(q_saved, k_saved, v, o, lse, *(() if mask is None else (mask,)),
                          *(() if table is None else (table.cos, table.sin)), *((q, k) if table_grad else ()))
    ctx.table_meta = None if table is None else (table.prefix_tokens, table.layout)
    ctx.has_mask = mask is not None
    ctx.scale = scale


def _saved(ctx):
    """-> q, k (as saved), v, o, lse, the mask (or None), the table (or None), the unrotated q and k (empty when
    not saved), scale."""
    q, k, v, o, lse, *rest = ctx.saved_tensors
    mask = rest.pop(0) if ctx.has_mask else None
    if ctx.table_meta is None:
        return q, k, v, o, lse, mask, None, (), ctx.scale
    cos, sin, *unrotated = rest
    return q, k, v, o, lse, mask, Table(cos, sin, *ctx.table_meta), tuple(unrotated), ctx.scale


def _backward(do, q, k, v, o, lse, mask, rope, scale, out=None):
    """The backward kernels with this call's configs and backward path (ATTNHUB_TRITON_BWD); `out`: see
    `launch.backward`."""
    config = configs.for_call(q.device, q.shape[-1])
    fused = launch.use_fused_backward(config, q, k, rope, mask, settings.triton_bwd())
    return launch.backward(do, q, k, v, o, lse, rope, scale, config, fused, key_padding_mask=mask, out=out)


def _forward(ctx, q, k, v, cos, sin, rope, scale, mask, training: bool, grad_strides: tuple | None = None):
    """The forward of both autograd Functions: o, and with `training` what the backward needs kept on ctx, its
    launch planned (`launch.plan_backward`; grad_strides: dq, dk, dv's, None for contiguous ones)."""
    config = configs.for_call(q.device, q.shape[-1])
    table = None if rope is None else Table(cos, sin, rope.prefix_tokens, rope.layout)
    if training and q.is_cuda and runtime.CAN_COMPILE_AHEAD and settings.compile_ahead():
        launch.compile_ahead(q, k, v, table, scale, config, key_padding_mask=mask)
    o, lse, (q_saved, k_saved) = launch.forward(q, k, v, table, scale, training, config, key_padding_mask=mask)
    if training:
        _save(ctx, q, k, v, table, scale, o, lse, q_saved, k_saved, mask)
        ctx.plan = launch.plan_backward(q_saved, k_saved, v, o, table, scale, config, mask, grad_strides)
    return o


def _grads(ctx, do, out=None):
    """-> dq, dk, dv (into `out` when given), dcos, dsin of the call saved on ctx: as the forward planned it where
    the call matches the plan, else by `launch.backward`."""
    q, k, v, o, lse, mask, table, unrotated, scale = _saved(ctx)
    plan = ctx.plan
    if plan is not None and plan.matches(do, out):
        dq, dk, dv = plan.run(do, q, k, v, o, lse, table, out)
    else:
        dq, dk, dv = _backward(do, q, k, v, o, lse, mask, table, scale, out)
    dcos, dsin = _table_grad(table, *unrotated, dq, dk) if unrotated else (None, None)
    return dq, dk, dv, dcos, dsin


class FlashRopeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cos, sin, rope, scale, mask):
        """cos, sin: rope's tables (None without RoPE), inputs only so that autograd hands back their gradients;
        mask: the key padding mask or None."""
        return _forward(ctx, q, k, v, cos, sin, rope, scale, mask, any(ctx.needs_input_grad[:5]))

    @staticmethod
    def backward(ctx, do):
        return *_grads(ctx, do), None, None, None


class ReplayedAttention(torch.autograd.Function):
    """FlashRopeAttention of a call `replay` took: its forward and backward are one C++ call each where they can
    be, else the Python path's launches (the same kernels)."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, call: replay.TrainingCall):
        return _replayed_forward(ctx, q, k, v, cos, sin, call)

    @staticmethod
    def backward(ctx, do):
        return *_replayed_grads(ctx, do), None, None, None


def _replayed_forward(ctx, q, k, v, cos, sin, call: replay.TrainingCall):
    """The replayed forward body (else the Python path's launches), what the backward needs saved on ctx -> o."""
    out = call.forward(q, k, v, cos, sin)
    if out is None:
        o, lse, (q_saved, k_saved) = launch.forward(q, k, v, call.table(cos, sin), call.scale, True, call.config)
    else:
        o, lse, q_saved, k_saved = out
    ctx.save_for_backward(q_saved, k_saved, v, o, lse, *(() if cos is None else (cos, sin)))
    ctx.call = call
    return o


class ReplayedAttentionPacked(torch.autograd.Function):
    """FlashRopeAttentionPacked of a call `replay` took: `ReplayedAttention`'s bodies, the backward
    one returning the projection's gradient whole."""

    @staticmethod
    def forward(ctx, qkv, q, k, v, cos, sin, call: replay.TrainingCall):
        """q, k, v: qkv's `launch.packed_views`, detached."""
        return _replayed_forward(ctx, q, k, v, cos, sin, call)

    @staticmethod
    def backward(ctx, do):
        (dqkv,) = _replayed_grads(ctx, do)
        return dqkv, None, None, None, None, None, None


def _replayed_grads(ctx, do) -> list:
    """The replayed backward body's gradients, dq, dk, dv (packed: [dqkv], the projection's), else the Python path's
    launches into the same (a gradient laid out otherwise than o, an input the body cannot launch with)."""
    call, saved = ctx.call, ctx.saved_tensors
    grads = call.backward(do, saved)
    if grads is not None:
        return grads
    q, k, v, o, lse, *table = saved
    table = call.table(*table) if table else None
    if call.packed is None:
        return list(_backward(do, q, k, v, o, lse, None, table, call.scale))
    dqkv = torch.empty(call.packed, device=do.device, dtype=v.dtype)
    _backward(do, q, k, v, o, lse, None, table, call.scale, out=launch.packed_views(dqkv))
    return [dqkv]


class FlashRopeAttentionPacked(torch.autograd.Function):
    """FlashRopeAttention of a fused projection qkv [B, N, 3, H, D] (`attnhub.attention_packed`): autograd sees qkv
    as the input, and the backward writes dq, dk, dv straight into one gradient of its shape, where the views' own
    backward would copy three gradients into one (a quarter of the kernels' time at NaFlexViT-B's shapes:
    benchmarks/README.md)."""

    @staticmethod
    def forward(ctx, qkv, q, k, v, cos, sin, rope, scale, mask):
        """q, k, v: qkv's `launch.packed_views`, detached (they are read; their gradients go to qkv)."""
        ctx.proj = qkv.shape, qkv.dtype
        return _forward(ctx, q, k, v, cos, sin, rope, scale, mask,
                        ctx.needs_input_grad[0] or any(ctx.needs_input_grad[4:6]), launch.packed_strides(qkv.shape))

    @staticmethod
    def backward(ctx, do):
        shape, dtype = ctx.proj
        dqkv = torch.empty(*shape, device=do.device, dtype=dtype)
        _, _, _, dcos, dsin = _grads(ctx, do, out=launch.packed_views(dqkv))
        return dqkv, None, None, None, dcos, dsin, None, None, None


def _op_table(cos, sin, prefix: int, layout: str) -> Table | None:
    return None if layout == "none" else Table(cos, sin, prefix, layout)


def _fwd_impl(q, k, v, cos, sin, prefix: int, layout: str, scale: float, save_rotated: bool, mask):
    """The forward operators' run: -> o [B, H, N, D], lse [B*H, N] fp32, rotated q and k (or empty when not
    saved)."""
    rope = _op_table(cos, sin, prefix, layout)
    o, lse, (qr, kr) = launch.forward(q, k, v, rope, scale, save_rotated, configs.for_call(q.device, q.shape[-1]),
                                      key_padding_mask=mask)
    if not (save_rotated and rope is not None):
        qr, kr = q.new_empty(0), k.new_empty(0)
    return o, lse, qr, kr


def _fwd_fake(q, k, layout: str, save_rotated: bool):
    """`_fwd_impl`'s outputs' shapes, dtypes and strides."""
    B, H, N_Q, D = q.shape
    lse = q.new_empty(B * H, N_Q, dtype=torch.float32)
    if save_rotated and layout != "none":
        rot_dtype = launch.rot_dtype(q.dtype)
        qr, kr = q.new_empty(q.shape, dtype=rot_dtype), k.new_empty(k.shape, dtype=rot_dtype)
    else:
        qr, kr = q.new_empty(0), k.new_empty(0)
    return launch.output_like(q), lse, qr, kr


@torch.library.custom_op("attnhub::triton_fa_rope_fwd", mutates_args=())
def fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    prefix: int, layout: str, scale: float, save_rotated: bool, mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> o [B, H, N, D], lse [B*H, N] fp32, rotated q and k (or empty when not saved)."""
    return _fwd_impl(q, k, v, cos, sin, prefix, layout, scale, save_rotated, mask)


@fwd_op.register_fake
def _(q, k, v, cos, sin, prefix, layout, scale, save_rotated, mask=None):
    return _fwd_fake(q, k, layout, save_rotated)


@torch.library.custom_op("attnhub::triton_fa_rope_bwd", mutates_args=())
def bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], prefix: int, layout: str, scale: float,
    mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k: rotated (saved by the forward) with RoPE -> dq, dk, dv."""
    return _backward(do, q, k, v, o, lse, mask, _op_table(cos, sin, prefix, layout), scale)


@bwd_op.register_fake
def _(do, q, k, v, o, lse, cos, sin, prefix, layout, scale, mask=None):
    return tuple(torch.empty(t.shape, device=t.device, dtype=v.dtype) for t in (q, k, v))


def _op_setup_context(ctx, inputs, output):
    q, k, v, cos, sin, prefix, layout, scale, _, mask = inputs
    o, lse, qr, kr = output
    table = _op_table(cos, sin, prefix, layout)
    _save(ctx, q, k, v, table, scale, o, lse, *((q, k) if table is None else (qr, kr)), mask)


def _op_backward(ctx, do, _dlse, _dqr, _dkr):
    q, k, v, o, lse, mask, table, unrotated, scale = _saved(ctx)
    op_table = (None, None, 0, "none") if table is None else (table.cos, table.sin, table.prefix_tokens, table.layout)
    dq, dk, dv = bwd_op(do, q, k, v, o, lse, *op_table, scale, mask)
    dcos, dsin = _table_grad(table, *unrotated, dq, dk) if unrotated else (None, None)
    return dq, dk, dv, dcos, dsin, None, None, None, None, None


fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# `attention_packed` under torch.compile: autograd sees the projection qkv [B, N, 3, H, D], and the backward returns
# its gradient whole, so Inductor copies no gradients of the views into it. Only where the Gluon backward kernels
# write into it (`_gluon_writes_packed`).
@torch.compiler.assume_constant_result
def _gluon_writes_packed(device: torch.device, dtype: torch.dtype, n: int, heads: int, head_dim: int, layout: str,
                         per_sample: bool) -> bool:
    """Whether the backward of an `attention_packed` call of these static facts (layout "none": no RoPE; per_sample: one
    table per sample) runs the Gluon kernels, decided once at trace time on stand-ins of qkv's views. Triton's kernels
    write 12-20% slower into qkv's gradient, and copying their gradients into it cost a compiled ViT-S step 1.4 ms of
    GPU time more than Inductor's copy of the views' (benchmarks/README.md): those calls run on the views."""
    q, k, _ = launch.packed_views(torch.empty(1, n, 3, heads, head_dim, device="meta", dtype=dtype))
    table_dim = 4 if per_sample else 2
    rope = None if layout == "none" else Table(*(torch.empty((1,) * table_dim, device="meta") for _ in "cs"), 0,
                                               layout)
    config = configs.for_call(device, head_dim)
    return (not launch.use_fused_backward(config, q, k, rope, None, settings.triton_bwd())
            and launch.gluon_split(config, q, k, rope, n))


@torch.library.custom_op("attnhub::triton_fa_rope_fwd_packed", mutates_args=())
def fwd_packed_op(
    qkv: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], prefix: int, layout: str,
    scale: float, save_rotated: bool, mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fwd_op` of qkv's three parts (`launch.packed_views`)."""
    return _fwd_impl(*launch.packed_views(qkv), cos, sin, prefix, layout, scale, save_rotated, mask)


@fwd_packed_op.register_fake
def _(qkv, cos, sin, prefix, layout, scale, save_rotated, mask=None):
    q, k, _ = launch.packed_views(qkv)
    return _fwd_fake(q, k, layout, save_rotated)


@torch.library.custom_op("attnhub::triton_fa_rope_bwd_packed", mutates_args=())
def bwd_packed_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], prefix: int, layout: str, scale: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`bwd_op` -> dqkv [B, N, 3, H, D], the kernels writing dq, dk, dv into it (`launch.packed_views`)."""
    B, H, N, D = q.shape
    dqkv = torch.empty(B, N, 3, H, D, device=do.device, dtype=v.dtype)
    _backward(do, q, k, v, o, lse, mask, _op_table(cos, sin, prefix, layout), scale, out=launch.packed_views(dqkv))
    return dqkv


@bwd_packed_op.register_fake
def _(do, q, k, v, o, lse, cos, sin, prefix, layout, scale, mask=None):
    B, H, N, D = q.shape
    return q.new_empty(B, N, 3, H, D, dtype=v.dtype)


def _op_packed_setup_context(ctx, inputs, output):
    qkv, cos, sin, prefix, layout, scale, save_rotated, mask = inputs
    _op_setup_context(ctx, (*launch.packed_views(qkv), cos, sin, prefix, layout, scale, save_rotated, mask), output)


def _op_packed_backward(ctx, do, _dlse, _dqr, _dkr):
    q, k, v, o, lse, mask, table, unrotated, scale = _saved(ctx)
    op_table = (None, None, 0, "none") if table is None else (table.cos, table.sin, table.prefix_tokens, table.layout)
    dqkv = bwd_packed_op(do, q, k, v, o, lse, *op_table, scale, mask)
    dcos, dsin = _table_grad(table, *unrotated, *launch.packed_views(dqkv)[:2]) if unrotated else (None, None)
    return dqkv, dcos, dsin, None, None, None, None, None


fwd_packed_op.register_autograd(_op_packed_backward, setup_context=_op_packed_setup_context)


def _packed_pays(q: torch.Tensor, rope: CosSinTable | None) -> bool:
    """`_gluon_writes_packed` of a traced call with static lengths (a dynamic length: the views)."""
    B, H, N, D = q.shape
    if not all(isinstance(x, int) for x in (H, N, D)):
        return False
    table = ("none", False) if rope is None else (rope.layout, rope.batched)
    return _gluon_writes_packed(q.device, q.dtype, N, H, D, *table)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: CosSinTable | None, scale: float, *,
    key_padding_mask: torch.Tensor | None = None, qkv: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [B, H, N, D], k, v: [B, H_kv, N_kv, D], rope: any table (shared, per head, per sample, from coordinates),
    key_padding_mask: bool [B, N_kv], qkv: [B, N, 3, H, D] that q, k, v are the `launch.packed_views` of (the API passes
    it only then) or None -> o: [B, H, N, D] in q's dtype (memory layout [B, N, H, D])."""
    mask = key_padding_mask
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                            or (rope is not None and rope.requires_grad))
    if torch.compiler.is_compiling():
        table = (None, None, 0, "none") if rope is None else (*rope.cos_sin(), rope.prefix_tokens, rope.layout)
        if training and qkv is not None and qkv.requires_grad and mask is None and _packed_pays(q, rope):
            return fwd_packed_op(qkv, *table, scale, training, mask)[0]
        return fwd_op(q, k, v, *table, scale, training, mask)[0]
    cos_sin = (None, None) if rope is None else rope.cos_sin()
    if not training:  # inference: no graph to record, so no autograd.Function (host time: benchmarks/README.md)
        table = None if rope is None else Table(*cos_sin, rope.prefix_tokens, rope.layout, rope)
        return launch.forward(q, k, v, table, scale, False, configs.for_call(q.device, q.shape[-1]),
                              key_padding_mask=mask)[0]
    if qkv is not None and qkv.requires_grad:  # the backward writes qkv's gradient whole
        call = None if mask is not None else replay.lookup(q, k, v, *cos_sin, rope, scale, packed=qkv.shape)
        if call is not None:
            return ReplayedAttentionPacked.apply(qkv, q.detach(), k.detach(), v.detach(), *cos_sin, call)
        return FlashRopeAttentionPacked.apply(qkv, q.detach(), k.detach(), v.detach(), *cos_sin, rope, scale, mask)
    call = None if mask is not None else replay.lookup(q, k, v, *cos_sin, rope, scale)
    if call is not None:
        return ReplayedAttention.apply(q, k, v, *cos_sin, call)
    return FlashRopeAttention.apply(q, k, v, *cos_sin, rope, scale, mask)
