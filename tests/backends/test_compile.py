"""torch.compile(fullgraph=True) reaches every backend without a graph break; the Triton custom operators pass
`torch.library.opcheck`; a compiled call does not re-dispatch or recompile for new inputs of the same shape.

CPU: the `aot_eager` compiler backend (Dynamo + AOTAutograd, no C++ toolchain needed), triton_fa_rope through
the interpreter in float32. GPU (`-m gpu`): Inductor, bf16.
"""

from __future__ import annotations

import pytest
import torch

import attnhub
from attnhub.registry import REGISTRY
from tests.helpers import Shape, assert_close_rel, available, make_learnable_table

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = sorted(REGISTRY.specs())


def _inputs(B, H, grid, P, D, dtype, device, layout="interleaved"):
    table = attnhub.CosSinTable(grid=grid, head_dim=D, prefix_tokens=P, layout=layout, device=device)
    q, k, v = (torch.randn(B, H, table.seq_len, D, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
    return q, k, v, table


def _fwd_bwd(fn, q, k, v, table, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, table)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


# (compiler, dtype, (B, H, grid, P, D)) per device: AOT eager, float32 and a tiny shape on the CPU (the Triton
# interpreter is slow); Inductor, bfloat16 and a ViT-S/16 shape on the GPU.
COMPILE_CASES = {
    "cpu": ("aot_eager", torch.float32, (2, 2, (3, 5), 1, 32)),
    "cuda": ("inductor", torch.bfloat16, (4, 6, (14, 14), 1, 64)),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layout", ["interleaved", "half", None])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_matches_eager_math(backend, layout, device):
    compiler, dtype, shape = COMPILE_CASES[device]
    torch._dynamo.reset()
    q, k, v, table = _inputs(*shape, dtype, device, layout or "interleaved")
    table = table if layout else None
    if why := available(backend, q, k, v, table):
        pytest.skip(f"{backend} cannot run this call: {why}")
    do = torch.randn_like(q)

    def f(q, k, v, table):
        return attnhub.attention(q, k, v, table, backend=backend)

    got = _fwd_bwd(torch.compile(f, fullgraph=True, backend=compiler), q, k, v, table, do)
    ref = _fwd_bwd(lambda *a: attnhub.attention(*(t.double() for t in a[:3]), a[3], backend="math"),
                   q, k, v, table, do.double())
    for what, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        assert_close_rel(a, b, dtype, f"{backend} {compiler} {what}", grad=what != "o")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_table_gradient(backend):
    """Learnable RoPE frequencies under torch.compile: the gradient reaches `emb` through the table, as in eager."""
    torch._dynamo.reset()
    s = Shape(2, 3, (3, 5), 1, 32, "interleaved", per_head=True)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(s.B, s.H, s.N, s.D, generator=gen).to(DEVICE) for _ in "qkv")  # where the table is
    do = torch.randn(s.B, s.H, s.N, s.D, generator=gen).to(DEVICE)
    state = gen.get_state()
    grads = []
    for compiled in (True, False):
        gen.set_state(state)
        emb, table = make_learnable_table(s, gen, torch.float32 if compiled else torch.float64)
        x = [t.detach().to(emb.dtype, copy=True).requires_grad_() for t in (q, k, v)]
        name = backend if compiled else "math"
        f = lambda q, k, v, t: attnhub.attention(q, k, v, t, backend=name)  # noqa: E731
        (torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f)(*x, table).backward(
            do.to(emb.dtype))
        grads.append([emb.grad, *(t.grad for t in x)])
    for what, a, b in zip(("emb", "dq", "dk", "dv"), *grads):
        assert_close_rel(a, b, torch.float32, f"{backend} compiled {what}")


def test_compiled_call_does_not_recompile_for_new_inputs(monkeypatch):
    torch._dynamo.reset()
    q, k, v, table = _inputs(2, 2, (4, 4), 1, 32, torch.float32, "cpu")
    calls = []
    real = attnhub.api.select.choose
    monkeypatch.setattr(attnhub.api.select, "choose", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    f = torch.compile(lambda q, k, v: attnhub.attention(q, k, v, table), fullgraph=True, backend="aot_eager")
    f(q, k, v)
    assert len(calls) == 1  # decided once, at trace time
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            q2, k2, v2 = (torch.randn_like(t).requires_grad_() for t in (q, k, v))
            f(q2, k2, v2)
    assert len(calls) == 1


def test_compiled_forced_backend_is_honoured_and_explained_by_trace():
    torch._dynamo.reset()
    q, k, v, table = _inputs(1, 2, (2, 2), 1, 32, torch.float32, "cpu")
    seen = []
    attnhub.register_backend("spy", lambda q, k, v, rope, scale: seen.append(1) or
                             attnhub.attention(q, k, v, rope, scale=scale, backend="math"), priority=-1,
                             devices=["cpu"])
    f = torch.compile(lambda q, k, v: attnhub.attention(q, k, v, table, backend="spy"), backend="aot_eager")
    with torch.no_grad():
        f(q, k, v)
    assert seen  # traced through the forced backend


@pytest.mark.parametrize("layout", ["interleaved", "interleaved_learnable", "none", "interleaved_per_sample_gqa_mask"])
def test_opcheck_triton_custom_ops(layout):
    """Schema, fake tensor, autograd registration and AOT dispatch of attnhub::triton_fa_rope_fwd (with a table
    that requires grad too; with one learnable table per sample, k/v on fewer heads and a key padding mask)."""
    from attnhub.backends.triton_fa_rope import autograd

    dtype = torch.float32
    q, k, v, table = _inputs(2, 2, (2, 3), 1, 32, dtype, DEVICE)
    cos, sin = (table.cos, table.sin) if layout != "none" else (None, None)
    mask = None
    if layout == "interleaved_learnable":
        cos, sin, layout = cos.clone().requires_grad_(), sin.clone().requires_grad_(), "interleaved"
    if layout.endswith("mask"):
        k, v = (t[:, :1].detach().clone().requires_grad_() for t in (k, v))
        cos, sin = (t.expand(2, 1, *t.shape).clone().requires_grad_() for t in (cos, sin))
        mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(0)).to(DEVICE) > 0.4
        mask[1] = False  # a sample without a valid key
        layout = "interleaved"
    args = (q, k, v, cos, sin, 1 if layout != "none" else 0, layout, 32**-0.5, True, mask)
    torch.library.opcheck(autograd.fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                       "test_autograd_registration", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("layout", ["interleaved", "half_learnable", "interleaved_per_sample_gqa"])
def test_opcheck_rope_rotate_op(layout):
    """attnhub::rope_rotate (triton_rope_sdpa's rotation): schema, fake tensor, autograd, AOT dispatch; also with
    one learnable table per sample ([B, 1, N_grid, D/2]) and k on fewer heads than q."""
    from attnhub.backends import triton_rope_sdpa as R

    q, k, _, table = _inputs(2, 2, (2, 3), 1, 32, torch.float32, DEVICE, layout.split("_")[0])
    cos, sin = table.cos, table.sin
    if layout.endswith("gqa"):
        k = k[:, :1].detach().clone().requires_grad_()
        cos, sin = (t.expand(2, 1, *t.shape).clone().requires_grad_() for t in (cos, sin))
    if layout.endswith("learnable"):
        cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    for inverse in (False, True):
        torch.library.opcheck(R._rotate_op, (q, k, cos, sin, 1, table.layout, inverse),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                          "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", ["math", "torch_sdpa", "triton_rope_sdpa", "triton_fa_rope"])
def test_fullgraph_key_padding_gqa_and_coords(backend):
    """Issue 12's arguments under torch.compile: a key padding mask, 4 query heads on 2 k/v heads, a per-sample
    table built from coordinates inside the graph with learnable frequencies; output and grads as eager."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(2, 2, 7, 16, generator=gen).to(DEVICE) for _ in "kv")
    mask = torch.rand(2, 7, generator=gen) > 0.3
    mask[:, 0] = True
    mask = mask.to(DEVICE)
    coords = (torch.rand(2, 6, 2, generator=gen) * 3).to(DEVICE)

    def f(q, k, v, freqs):
        table = attnhub.CosSinTable.from_coords(coords, freqs, prefix_tokens=1)
        return attnhub.attention(q, k, v, table, backend=backend, key_padding_mask=mask)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, attnhub.rope.axial_freqs(16).to(DEVICE))]
        o = fn(*leaves)
        return [o.detach(), *torch.autograd.grad(o, leaves, torch.ones_like(o))]

    for what, a, b in zip(("o", "dq", "dk", "dv", "dfreqs"), run(torch.compile(f, fullgraph=True, backend="aot_eager")),
                          run(f)):
        assert_close_rel(a, b, torch.float32, f"{backend} compiled {what}")
