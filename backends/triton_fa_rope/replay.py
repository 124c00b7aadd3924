"""Cached eager training calls of triton_fa_rope replayed from C++ (`attnhub.backends._replay`; ATTNHUB_TRITON_REPLAY=0
turns it off): per call signature, a forward body (allocate o, lse and the rotated q and k; launch the forward) and a
backward body (allocate dq, dk, dv and any scratch; launch the backward), each one call from Python. A packed call
(`attention_packed`: q, k, v views of one projection, as patched timm models call it) has a backward body that
allocates the projection's gradient whole and writes dq, dk, dv into its views (`autograd.ReplayedAttentionPacked`).

A signature's first call runs the Python path (`autograd.FlashRopeAttention`), which compiles its kernels and keeps
their runners. A later call builds the bodies from a dry run of the same launches (`launch.forward`; the planned
`FusedBackward.run` or the split `launch.backward`) and, once built, every call of the signature runs
`autograd.ReplayedAttention` on them. Calls this does not take keep the Python path: a key padding mask, a table that
requires grad, launches of a kernel through Triton's launcher, a tensor the call computes with PyTorch (a bf16 table
read as fp32), launch hooks set (a profiler's); a body's run that cannot launch (an input not 16-byte aligned) and a
gradient laid out otherwise than o run that call's Python path. A signature whose
gradients never come laid out like o keeps the Python path: the backward body's kernels are those of such a gradient,
which its calls never compiled.
"""

from __future__ import annotations

import torch

from attnhub import settings
from attnhub.backends import _replay
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import configs, launch
from attnhub.backends.triton_fa_rope.launch import Table

_TRIES = 3  # builds of one signature that find it not ready (a runner not kept yet) before it keeps the Python path
DEVICE_TYPE = "cuda"  # where calls replay (the CPU tests replay through a stand-in body in the interpreter)


class TrainingCall:
    """The bodies of one training call signature. forward(q, k, v, cos, sin) -> o, lse, q and k as saved (rotated
    with a table, else q and k), or None; backward(do, *saved) -> dq, dk, dv (packed: the shape of the projection
    [B, N, 3, H, D] whose gradient it returns whole, [dqkv]), or None (then the Python path)."""

    __slots__ = ("forward_body", "backward_body", "do_stride", "table_meta", "scale", "config", "packed")

    def __init__(self, forward_body, backward_body, do_stride: tuple, table_meta, scale: float, config,
                 packed: torch.Size | None = None) -> None:
        self.forward_body, self.backward_body, self.do_stride = forward_body, backward_body, do_stride
        self.table_meta, self.scale, self.config, self.packed = table_meta, scale, config, packed

    def table(self, cos, sin) -> Table | None:
        return None if self.table_meta is None else Table(cos, sin, *self.table_meta)

    def forward(self, q, k, v, cos, sin) -> tuple:
        if self.table_meta is None:
            out = self.forward_body(q, k, v)
            return None if out is None else (*out, q, k)
        return self.forward_body(q, k, v, cos, sin)

    def backward(self, do, saved: tuple):
        if not launch.laid_out(do, self.do_stride):
            return None
        return self.backward_body(do, *saved)


def lookup(q, k, v, cos, sin, rope, scale: float, packed: torch.Size | None = None) -> TrainingCall | None:
    """The replay of this eager training call (q, k, v: [B, H, N, D] on CUDA; cos, sin: the table's inputs, or None
    without RoPE; packed: the shape of the projection q, k, v are the views of, whose gradient the call returns
    whole, or None), or None: its Python path serves (the first call of a signature, one this cannot take, while the
    extension builds). `runtime.replay_cache` holds per signature a TrainingCall, None for the Python path, or how
    many builds found it not ready."""
    if not settings.triton_replay():
        return None
    calls = runtime.replay_cache()
    if calls is None or q.device.type != DEVICE_TYPE:
        return None
    if cos is not None and (cos.requires_grad or sin.requires_grad):
        return None
    config = configs.for_call(q.device, q.shape[-1])
    table = None if rope is None else (cos.shape, cos.stride(), sin.stride(), cos.dtype, rope.prefix_tokens,
                                       rope.layout)
    sig = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype, q.device, table,
           scale, id(config), settings.triton_bwd(), packed)
    hit = calls.get(sig, -1)
    if hit is None or type(hit) is TrainingCall:
        return hit
    if hit < 0:  # the first call: its Python path compiles the kernels and keeps their runners
        _remember(calls, sig, 0)
        return None
    tensors = (q, k, v) if cos is None else (q, k, v, cos, sin)
    if _replay.extension() is None or runtime.background_pending() or not runtime.aligned(*tensors):
        return None  # not yet (the kernels a misaligned call launches are not those of aligned ones): not counted
    call = _build(q, k, v, cos, sin, rope, scale, config, packed)
    _remember(calls, sig, call if call is not None or hit + 1 >= _TRIES else hit + 1)
    return call


def _remember(calls: dict, sig, value) -> None:
    if len(calls) >= 1024:
        calls.clear()
    calls[sig] = value


def _build(q, k, v, cos, sin, rope, scale: float, config, packed: torch.Size | None) -> TrainingCall | None:
    """The bodies of this call's signature from a dry run of its launches (the backward's as the Python path runs
    it: the planned fused backward, or the split one; packed, into views of one projection's gradient), or None
    where `_replay.body` cannot make them."""
    table = None if rope is None else Table(cos, sin, rope.prefix_tokens, rope.layout)
    with runtime.dry_run() as forward_launches:
        o, lse, (q_saved, k_saved) = launch.forward(q, k, v, table, scale, True, config)
    dqkv = None if packed is None else torch.empty(packed, device=q.device, dtype=q.dtype)
    out = None if dqkv is None else launch.packed_views(dqkv)
    grad_strides = None if packed is None else launch.packed_strides(packed)  # as the packed Function plans it
    plan = launch.plan_backward(q_saved, k_saved, v, o, table, scale, config, None, grad_strides)
    do = torch.empty_like(o)  # laid out like o, as the plan takes it (and as a model's gradient comes)
    with runtime.dry_run() as backward_launches:
        if plan is not None:  # the fused backward, as planned
            scratch = () if plan.single else plan.scratch_like(lse)
            grads = plan.run(do, q_saved, k_saved, v, o, lse, table, out, scratch=scratch or None)
        else:  # the split one
            scratch = (torch.empty_like(lse),)
            grads = launch.backward(do, q_saved, k_saved, v, o, lse, table, scale, config, False, out=out,
                                    delta=scratch[0])
    constants = (launch.dummy(q.device, torch.float32), launch.dummy(q.device, torch.uint8))
    tables = () if table is None else (cos, sin)
    returned = (o, lse) if table is None else (o, lse, q_saved, k_saved)
    forward_body = _replay.body(forward_launches, (q, k, v, *tables), returned, constants=constants)
    backward_body = _replay.body(backward_launches, (do, q_saved, k_saved, v, o, lse, *tables),
                                 grads if dqkv is None else (dqkv,), scratch, constants)
    if forward_body is None or backward_body is None:
        return None
    table_meta = None if table is None else (rope.prefix_tokens, rope.layout)
    return TrainingCall(forward_body, backward_body, o.stride(), table_meta, scale, config, packed)
