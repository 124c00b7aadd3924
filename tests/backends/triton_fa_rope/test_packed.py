"""triton_fa_rope's backward into one fused projection: when q, k, v are timm's split of a fused qkv projection
(`proj.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`), autograd sees the projection and the backward
kernels write dq, dk, dv straight into its gradient (`autograd.packed_projection`, `FlashRopeAttentionPacked`).

Gradients of the projection (and of a learnable table) against `math` in float64 through the same views, both
backward paths, RoPE shared, per head, per sample with a key padding mask, and none; every `torch.empty` buffer
NaN-filled (the projection's gradient is one: every element must be written); and the calls that must not take
the packed path. On CPU through the interpreter, on the GPU when there is one.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import attnhub
from attnhub import settings
from attnhub.backends.triton_fa_rope import autograd
from tests.helpers import DEVICE, TRITON, Shape, assert_close_rel, make_emb, make_table

pytestmark = pytest.mark.usefixtures("nan_empty")
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16

SHAPES = {  # table: "shared", "per_head", "per_sample" (with a key padding mask), None
    "shared_p1_d32": (Shape(2, 2, (7, 10), 1, 32, "interleaved"), "shared"),
    "per_head_half_p5_d64": (Shape(1, 3, (5, 6), 5, 64, "half", per_head=True), "per_head"),
    "per_sample_mask_p1_d32": (Shape(3, 2, (6, 6), 1, 32, "interleaved"), "per_sample"),
    "none_p1_d64": (Shape(2, 2, (4, 5), 1, 64, None), None),
}


def _split(proj: torch.Tensor, H: int, D: int):
    B, N, _ = proj.shape
    return proj.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)


def _table_and_mask(s: Shape, kind, gen, dtype=torch.float32, learnable=False):
    """-> (table builder from an embedding or None, the embedding (a leaf when learnable) or None, mask or None)."""
    if kind is None:
        return None, None, None
    if kind == "shared":
        table = make_table(s, gen)
        return (lambda emb: table), None, None
    if kind == "per_head":
        emb = make_emb(s, gen, heads=True, dtype=dtype)
    else:  # one table per sample, and padding keys at each sample's end
        emb = torch.stack([make_emb(s, gen, heads=False, dtype=dtype) for _ in range(s.B)])[:, None]
    emb = emb.to(DEVICE).requires_grad_(learnable)
    mask = None
    if kind == "per_sample":
        lengths = torch.randint(s.P + 1, s.N + 1, (s.B,), generator=gen)
        mask = (torch.arange(s.N)[None] < lengths[:, None]).to(DEVICE)
    return (lambda e: attnhub.CosSinTable.from_sin_cos(e, prefix_tokens=s.P, layout=s.layout)), emb, mask


@pytest.mark.parametrize("path", ["split", "fused"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_projection_gradient_matches_math_in_float64(name, path):
    s, kind = SHAPES[name]
    gen = torch.Generator().manual_seed(len(name))
    learnable = kind in ("per_head", "per_sample")  # RoPE-Mixed: the table's gradient too
    build, emb, mask = _table_and_mask(s, kind, gen, learnable=learnable)
    proj0 = torch.randn(s.B, s.N, 3 * s.H * s.D, generator=gen).to(DEVICE, DTYPE)
    do = torch.randn(s.B, s.H, s.N, s.D, generator=gen).to(DEVICE, DTYPE)

    def run(backend, dtype):
        proj = proj0.detach().to(dtype).requires_grad_()
        e = None if emb is None else emb.detach().to(torch.float64 if dtype == torch.float64 else emb.dtype) \
            .requires_grad_(learnable)
        q, k, v = _split(proj * 1, s.H, s.D)  # views of a non-leaf, as a Linear's output hands them over
        table = None if build is None else build(e)
        o = attnhub.attention(q, k, v, table, backend=backend, key_padding_mask=mask)
        if mask is not None:  # padded query rows are not compared (what they compute is unspecified)
            o = torch.where(mask[:, None, :, None], o, 0)
        o.backward(do.to(dtype))
        return o, proj.grad, None if e is None or not learnable else e.grad

    with settings.override(triton_bwd=path), mock.patch.object(
            autograd.FlashRopeAttentionPacked, "apply", wraps=autograd.FlashRopeAttentionPacked.apply) as packed:
        got = run(TRITON, DTYPE)
    assert packed.call_count == 1, "the packed path was not taken"
    ref = run("math", torch.float64)
    for what, a, b in zip(("o", "d proj", "d table"), got, ref):
        if b is not None:
            assert_close_rel(a, b, DTYPE, f"{name} {path} {what}", grad=what != "o")


def test_other_uses_of_the_views_add_their_gradients():
    """q also feeds another op: its gradient from there reaches the projection through the views, and adds."""
    s, _ = SHAPES["shared_p1_d32"]
    table = make_table(s, torch.Generator().manual_seed(0))
    proj0 = torch.randn(s.B, s.N, 3 * s.H * s.D, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)

    def run(backend, dtype):
        proj = proj0.detach().to(dtype).requires_grad_()
        q, k, v = _split(proj * 1, s.H, s.D)
        (attnhub.attention(q, k, v, table, backend=backend).sum() + (q * q).sum() + v.mean()).backward()
        return proj.grad

    assert_close_rel(run(TRITON, DTYPE), run("math", torch.float64), DTYPE, "d proj", grad=True)


def _views(kind: str):
    B, N, H, D = 2, 17, 2, 32
    proj = torch.randn(B, N, 3 * H * D, device=DEVICE, requires_grad=True) * 1
    if kind == "packed":
        return _split(proj, H, D)
    if kind == "leaves":
        return [t.detach().requires_grad_() for t in _split(proj, H, D)]
    if kind == "detached_k":
        q, k, v = _split(proj, H, D)
        return q, k.detach(), v
    if kind == "no_grad":
        return _split(proj.detach(), H, D)
    if kind == "heads_major":  # [B, N, H, 3, D]: the same numbers, another split
        return proj.reshape(B, N, H, 3, D).permute(3, 0, 2, 1, 4).unbind(0)
    if kind == "two_unbinds":
        a, b = _split(proj, H, D), _split(proj, H, D)
        return a[0], b[1], a[2]
    if kind == "part_of_a_larger_tensor":
        wide = torch.randn(B, N, 4 * H * D, device=DEVICE, requires_grad=True) * 1
        return _split(wide[..., : 3 * H * D], H, D)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["leaves", "detached_k", "no_grad", "heads_major", "two_unbinds",
                                  "part_of_a_larger_tensor"])
def test_only_exact_splits_of_one_projection_are_packed(kind):
    assert autograd.packed_projection(*_views("packed")) is not None
    assert autograd.packed_projection(*_views(kind)) is None
