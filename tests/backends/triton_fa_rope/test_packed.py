"""`attnhub.attention_packed` on triton_fa_rope: autograd sees the fused projection qkv [B, N, 3, H, D], and the
backward kernels write dq, dk, dv straight into its gradient (`FlashRopeAttentionPacked`; under torch.compile the
operators `fwd_packed_op` / `bwd_packed_op`).

Gradients of qkv (and of a learnable table) against `math` in float64 (which runs the views), both backward paths,
RoPE shared, per head, per sample with a key padding mask, and none; every `torch.empty` buffer NaN-filled (qkv's
gradient is one: every element must be written); qkv's other uses; `torch.autograd.grad` w.r.t. qkv; calls that
run on the views instead (inference, autocast casting them, another backend); torch.compile and the operators'
opcheck; bad qkv. On CPU through the interpreter, on the GPU when there is one.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import attnhub
from attnhub import settings
from attnhub.backends.triton_fa_rope import autograd
from tests.helpers import DEVICE, TRITON, Shape, assert_close_rel, make_emb, make_table, plan_as_compiled

pytestmark = pytest.mark.usefixtures("nan_empty")
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16

SHAPES = {  # table: "shared", "per_head", "per_sample" (with a key padding mask), None
    "shared_p1_d32": (Shape(2, 2, (7, 10), 1, 32, "interleaved"), "shared"),
    "per_head_half_p5_d64": (Shape(1, 3, (5, 6), 5, 64, "half", per_head=True), "per_head"),
    "per_sample_mask_p1_d32": (Shape(3, 2, (6, 6), 1, 32, "interleaved"), "per_sample"),
    "none_p1_d64": (Shape(2, 2, (4, 5), 1, 64, None), None),
}


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
        qkv = (proj * 1).reshape(s.B, s.N, 3, s.H, s.D)  # a view of a non-leaf, as from a Linear's output
        o = attnhub.attention_packed(qkv, None if build is None else build(e), backend=backend,
                                     key_padding_mask=mask)
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


def _qkv(dtype=DTYPE, seed=1):
    s, _ = SHAPES["shared_p1_d32"]
    proj = torch.randn(s.B, s.N, 3 * s.H * s.D, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return s, make_table(s, torch.Generator().manual_seed(0)), proj.requires_grad_()


def test_other_uses_of_qkv_add_their_gradients_and_autograd_grad_reaches_it():
    s, table, proj0 = _qkv()

    def run(backend, dtype):
        proj = proj0.detach().to(dtype).requires_grad_()
        qkv = proj.reshape(s.B, s.N, 3, s.H, s.D)
        loss = attnhub.attention_packed(qkv, table, backend=backend).sum() + (qkv * qkv).sum()
        return torch.autograd.grad(loss, qkv)[0]

    assert_close_rel(run(TRITON, DTYPE), run("math", torch.float64), DTYPE, "d qkv", grad=True)


@pytest.mark.parametrize("case", ["no_grad", "autocast_casts_the_views", "other_backend"])
def test_calls_that_run_on_the_views(case):
    """Same results and gradients, through FlashRopeAttention on the views (or another backend's entry)."""
    s, table, proj = _qkv(torch.float32)
    qkv = proj.reshape(s.B, s.N, 3, s.H, s.D)
    with mock.patch.object(autograd.FlashRopeAttentionPacked, "apply",
                           wraps=autograd.FlashRopeAttentionPacked.apply) as packed:
        if case == "no_grad":
            with torch.no_grad():
                o = attnhub.attention_packed(qkv, table, backend=TRITON)
        elif case == "autocast_casts_the_views":  # fp32 qkv, fp16 compute: q, k, v are no longer qkv's views
            if DEVICE == "cpu":
                pytest.skip("CPU autocast runs bfloat16, which the interpreter's dots do not (triton#11584)")
            with torch.autocast("cuda", dtype=torch.float16):
                o = attnhub.attention_packed(qkv, table, backend=TRITON)
            o.float().sum().backward()
            assert proj.grad is not None and torch.isfinite(proj.grad).all()
        else:
            o = attnhub.attention_packed(qkv, table, backend="torch_sdpa")
            o.sum().backward()
            assert proj.grad is not None
    assert packed.call_count == 0
    q, k, v = qkv.detach().permute(2, 0, 3, 1, 4).unbind(0)
    with torch.no_grad():
        ref = attnhub.attention(q.double(), k.double(), v.double(), table, backend="math")
    assert_close_rel(o.detach(), ref, o.dtype, case)


@pytest.mark.parametrize("bad,error", [("list", TypeError), ("4d", ValueError), ("two_parts", ValueError)])
def test_bad_qkv_is_a_typed_error_naming_it(bad, error):
    qkv = torch.randn(2, 5, 3, 2, 32)
    arg = {"list": [qkv], "4d": qkv[:, :, 0], "two_parts": qkv[:, :, :2]}[bad]
    with pytest.raises(error, match="qkv"):
        attnhub.attention_packed(arg)


COMPILED = {  # name -> (shape, table kind); the GPU case's backward runs the Gluon kernels (elsewhere Triton's)
    "shared_p1_d32": SHAPES["shared_p1_d32"],
    "learnable": SHAPES["per_head_half_p5_d64"],
    "none_p1_d64": SHAPES["none_p1_d64"],
    "gluon_n577": (Shape(2, 3, (24, 24), 1, 64, "interleaved"), "shared"),
}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "views"])
@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_fullgraph_matches_math(name, packed, monkeypatch):
    """Under torch.compile (aot_eager on the CPU, Inductor on the GPU) attention_packed runs the packed operators
    where the Gluon backward serves the call (at N = 577 on a Hopper GPU; forced here elsewhere, Triton's kernels
    then writing into qkv's gradient), else the views: qkv's (and a learnable table's) gradient matches math in
    float64."""
    if name == "gluon_n577" and (DEVICE == "cpu" or not packed):
        pytest.skip("Gluon kernels on a Hopper GPU (the interpreter runs Triton's kernels at every length)")
    if name != "gluon_n577":
        monkeypatch.setattr(autograd, "_gluon_writes_packed", lambda *facts: packed)
    torch._dynamo.reset()
    learnable = name == "learnable"
    s, kind = COMPILED[name]
    gen = torch.Generator().manual_seed(3)
    build, emb, mask = _table_and_mask(s, kind, gen, learnable=learnable)
    proj0 = torch.randn(s.B, s.N, 3 * s.H * s.D, generator=gen).to(DEVICE, DTYPE)

    def f(proj, table):
        return attnhub.attention_packed(proj.reshape(s.B, s.N, 3, s.H, s.D), table, backend=TRITON)

    def run(fn, dtype):
        proj = proj0.detach().to(dtype).requires_grad_()
        e = None if emb is None else emb.detach().to(torch.float64 if dtype == torch.float64 else emb.dtype) \
            .requires_grad_(learnable)
        fn(proj, None if build is None else build(e)).square().sum().backward()  # the table is built eagerly
        return proj.grad, None if e is None or not learnable else e.grad

    got = run(torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor"), DTYPE)
    ref = run(lambda proj, table: attnhub.attention_packed(proj.reshape(s.B, s.N, 3, s.H, s.D), table,
                                                           backend="math"), torch.float64)
    for what, a, b in zip(("d qkv", "d table"), got, ref):
        if b is not None:
            assert_close_rel(a, b, DTYPE, f"compiled {what}", grad=True)


@pytest.mark.parametrize("gluon", [True, False])
def test_compiled_graph_calls_the_packed_operator(gluon, monkeypatch):
    """The traced graph takes qkv whole (the packed operator), not the views, for a call that needs qkv's gradient
    where the Gluon backward serves it (else the views); without grad it runs the plain forward operator."""
    torch._dynamo.reset()
    monkeypatch.setattr(autograd, "_gluon_writes_packed", lambda *facts: gluon)
    s, table, proj = _qkv(torch.float32)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    f = torch.compile(lambda p: attnhub.attention_packed(p.reshape(s.B, s.N, 3, s.H, s.D), table, backend=TRITON),
                      backend=capture, fullgraph=True)
    f(proj).sum().backward()
    assert proj.grad is not None and torch.isfinite(proj.grad).all()
    assert ("triton_fa_rope_fwd_packed" in graphs[-1]) == gluon and "triton_fa_rope_fwd" in graphs[-1]
    with torch.no_grad():
        f(proj.detach())
    assert "triton_fa_rope_fwd_packed" not in graphs[-1] and "triton_fa_rope_fwd" in graphs[-1]


@pytest.mark.parametrize("table_kind", ["shared", "learnable", None])
def test_opcheck_packed_operator(table_kind):
    """Schema, fake tensor, autograd registration and AOT dispatch of attnhub::triton_fa_rope_fwd_packed."""
    s, table, proj = _qkv(torch.float32)
    qkv = proj.detach().reshape(s.B, s.N, 3, s.H, s.D).requires_grad_()
    cos, sin = (None, None) if table_kind is None else (table.cos, table.sin)
    if table_kind == "learnable":
        cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    args = (qkv, cos, sin, s.P if cos is not None else 0, s.layout if cos is not None else "none", s.D ** -0.5, True,
            None)
    torch.library.opcheck(autograd.fwd_packed_op, args, test_utils=(
        "test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("case,expected", [("n577", True), ("n197", False), ("fp32", False), ("half", False),
                                           ("per_sample", False), ("d32", False), ("fused_forced", False),
                                           ("no_rope_n577", True)])
def test_the_packed_operators_run_where_the_gluon_backward_writes_qkv(case, expected, monkeypatch):
    """At trace time, on static facts of a Hopper GPU: from `gluon_bwd_from_n` tokens (equal heads, D = 64, bf16,
    interleaved or no RoPE, one table or one per head; not the fused backward forced), else the views."""
    from attnhub.backends.triton_fa_rope import configs, launch

    plan_as_compiled(monkeypatch)
    monkeypatch.setattr(configs, "for_call", lambda device, head_dim: configs.for_arch(9, head_dim))
    facts = dict(device=torch.device("cpu"), dtype=torch.bfloat16, n=577, heads=12, head_dim=64,
                 layout="interleaved", per_sample=False)
    facts.update({"n197": dict(n=197), "fp32": dict(dtype=torch.float32), "half": dict(layout="half"),
                  "per_sample": dict(per_sample=True), "d32": dict(head_dim=32), "fused_forced": {},
                  "no_rope_n577": dict(layout="none")}.get(case, {}))
    if launch._gluon("gluon_bwd") is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    with settings.override(triton_bwd="fused" if case == "fused_forced" else "auto"):
        assert autograd._gluon_writes_packed(*facts.values()) == expected


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
                    reason="needs a Hopper GPU")
def test_on_hopper_a_vit_b384_call_takes_the_packed_operators():
    """The trace-time decision on this GPU's own config table: ViT-B/16 at 384 px (N = 577) is the Gluon
    backward's, ViT-B/16 at 224 px (N = 197) is not."""
    for n, grid, expected in ((577, 24, True), (197, 14, False)):
        q = torch.empty(2, n, 3, 12, 64, device="cuda", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)[0]
        table = attnhub.CosSinTable(grid=(grid, grid), head_dim=64, prefix_tokens=1, layout="interleaved",
                                    device="cuda")
        assert autograd._packed_pays(q, table) == expected, n
