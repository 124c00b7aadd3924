"""The fused one-launch backward of triton_fa_rope (`bwd_fused_kernel`) against the split three-kernel backward
and `math` in float64; bitwise repeatability; the automatic choice.

The path is switched with `settings.override(triton_bwd=...)` (what ATTNHUB_TRITON_BWD sets), and each run
records which backward kernels it launched (`runtime.recording`).
Every `torch.empty` buffer of a run is filled with NaN, so a
kernel that reads scratch or output memory it has not written (e.g. the dq accumulator) fails loudly.
On CPU (Triton interpreter, blocks of 32) float32 and float16, with N >= 70 tokens: several query and key
blocks, the last one partial; with CUDA the same tests run on the GPU.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

import attnhub
from attnhub import settings
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import configs, launch
from tests.helpers import (
    DEVICE, TRITON, Shape, assert_close_rel, available, make_qkv, make_table, make_tensor, run_backend,
)

SHAPES = {  # N = P + gh * gw
    "il_p1_7x10_d32": Shape(1, 2, (7, 10), 1, 32, "interleaved"),
    "half_p0_8x9_d64": Shape(2, 1, (8, 9), 0, 64, "half"),
    "il_p5_6x12_d48": Shape(1, 2, (6, 12), 5, 48, "interleaved"),  # HEAD_D != BLOCK_D: pair loads, no split
    "half_p5_5x14_d48": Shape(1, 1, (5, 14), 5, 48, "half"),
    "il_p1_3x5_d64": Shape(2, 1, (3, 5), 1, 64, "interleaved"),  # one partial block
    "norope_p1_7x10_d64": Shape(1, 2, (7, 10), 1, 64, None),
    "perhead_il_p1_7x10_d32": Shape(1, 2, (7, 10), 1, 32, "interleaved", per_head=True),
    "perhead_half_p0_8x9_d64": Shape(1, 2, (8, 9), 0, 64, "half", per_head=True),
    "cross_16x70_d32": Shape(1, 2, (3, 5), 1, 32, None, n_kv=70),
    "cross_71x40_d48": Shape(1, 2, (7, 10), 1, 48, None, n_kv=40),
}
HALF_SHAPES = ["il_p1_7x10_d32", "il_p5_6x12_d48", "cross_16x70_d32"]
STRIDED = [("il_p1_7x10_d32", "fused"), ("half_p5_5x14_d48", "d_strided"), ("norope_p1_7x10_d64", "transposed")]
SPLIT_KERNELS = ["bwd_preprocess", "bwd_dkdv_kernel", "bwd_dq_kernel"]
BWD_KERNELS = {"bwd_fused_kernel", *SPLIT_KERNELS}


pytestmark = pytest.mark.usefixtures("nan_empty")  # every torch.empty / empty_like buffer NaN-filled


def _inputs(s: Shape, dtype, kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(kind, s.B, s.H, s.N, s.D, dtype, gen, s.n_kv)
    do = make_tensor("transposed" if kind == "fused" else kind, s.B, s.H, s.N, s.D, dtype, gen)
    table = make_table(s, gen)
    why = available(TRITON, q, k, v, table)
    if why:
        pytest.skip(why)
    return q, k, v, do, table


# The fused backward with every query in one block (the short-sequence path: dq in registers, no scratch); the
# default configs take several blocks at these lengths on the interpreter (blocks of 32).
SINGLE_BLOCK = configs.KernelConfig(128, 32, 4 if DEVICE == "cuda" else 1, 1)


def _grads(path: str, q, k, v, do, table):
    """dq, dk, dv of triton_fa_rope with the backward path forced to `path` ("split", "fused" or "fused_single",
    the latter with SINGLE_BLOCK); checks the kernels it launched."""
    fields = {"bwd_fused": SINGLE_BLOCK} if path == "fused_single" else {}
    with settings.override(triton_bwd=path.removesuffix("_single")), configs.override(**fields), \
            runtime.recording() as recorded:
        grads = run_backend(TRITON, q, k, v, do, table)[1:]
    launches = [x.name for x in recorded if x.name in BWD_KERNELS]
    assert launches == (SPLIT_KERNELS if path == "split" else ["bwd_fused_kernel"]), launches
    if path == "fused_single":
        assert [x.constexprs.get("SINGLE_M") for x in recorded if x.name == "bwd_fused_kernel"] == [True]
    return grads


def _check(shape_name: str, dtype, kind: str, seed: int) -> None:
    q, k, v, do, table = _inputs(SHAPES[shape_name], dtype, kind, seed)
    if kind != "contiguous":
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or do.is_contiguous())
    ref = run_backend("math", *(t.detach().double() for t in (q, k, v, do)), table)[1:]
    fused = _grads("fused", q, k, v, do, table)
    single = _grads("fused_single", q, k, v, do, table)
    split = _grads("split", q, k, v, do, table)
    for what, f, one, s, r, x in zip(("dq", "dk", "dv"), fused, single, split, ref, (q, k, v)):
        assert f.dtype == dtype and f.shape == x.shape, f"fused {what}: {f.dtype} {tuple(f.shape)}"
        assert_close_rel(f, r, dtype, f"fused {what} vs math")
        assert_close_rel(one, r, dtype, f"fused single-block {what} vs math")
        assert_close_rel(s, r, dtype, f"split {what} vs math")
        assert_close_rel(f, s, dtype, f"fused {what} vs split")


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_float32(shape_name):
    _check(shape_name, torch.float32, "contiguous", 11)


@pytest.mark.parametrize("shape_name", HALF_SHAPES)
def test_float16(shape_name):
    _check(shape_name, torch.float16, "contiguous", 12)


@pytest.mark.parametrize("shape_name,kind", STRIDED)
def test_strided(shape_name, kind):
    _check(shape_name, torch.float32, kind, 13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_is_bitwise_repeatable(dtype):
    q, k, v, do, table = _inputs(SHAPES["il_p1_7x10_d32"], dtype, "transposed", 14)
    first = _grads("fused", q, k, v, do, table)
    second = _grads("fused", q, k, v, do, table)
    for what, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.isfinite(a).all() and a.abs().sum() > 0, f"{what} is not finite or all zero"
        assert torch.equal(a, b), f"fused {what} differs between two identical backward passes"


@pytest.mark.parametrize("max_n,expected", [(71, ["bwd_fused_kernel"]), (70, SPLIT_KERNELS)])
def test_auto_takes_fused_up_to_the_configured_length(max_n, expected):
    """auto: fused while max(N_Q, N_KV) <= the config's bwd_fused_max_n (71 tokens here), else split."""
    q, k, v, do, table = _inputs(Shape(1, 2, (7, 10), 1, 32, None, n_kv=16), torch.float32, "contiguous", 15)
    with configs.override(bwd_fused_max_n=max_n), settings.override(triton_bwd="auto"), \
            runtime.recording() as recorded:
        run_backend(TRITON, q, k, v, do, table)  # N_Q = 71, N_KV = 16: the longer one decides
    assert [x.name for x in recorded if x.name in BWD_KERNELS] == expected


# The forward plans its fused backward (`launch.plan_backward`), and a backward that matches the plan only runs it
# (`FusedBackward.run`); any other backward takes `launch.backward`, as without a plan.
@contextlib.contextmanager
def _counting_planned_runs(plans: bool = True):
    """Within the block the fused backward is forced; yields a list that gets one entry per backward that ran the
    forward's plan (not `launch.backward`'s); plans=False: the forward plans nothing."""
    ran = []
    real_matches, real_plan = launch.FusedBackward.matches, launch.plan_backward

    def matches(self, *args):  # True: the backward runs this plan (autograd._grads), not `launch.backward`
        hit = real_matches(self, *args)
        if hit:
            ran.append(self)
        return hit

    with mock.patch.object(launch.FusedBackward, "matches", matches), \
            mock.patch.object(launch, "plan_backward", real_plan if plans else lambda *a, **kw: None), \
            settings.override(triton_bwd="fused"):
        yield ran


def _planned_grads(q, k, v, do, table, between=contextlib.nullcontext, plans: bool = True):
    """(dq, dk, dv, how many backward passes ran the forward's plan) of one fused-path call whose backward runs
    inside `between()`; plans: see `_counting_planned_runs`."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with _counting_planned_runs(plans) as ran:
        o = attnhub.attention(q, k, v, table, backend=TRITON)
        with between():
            o.backward(do)
    return q.grad, k.grad, v.grad, len(ran)


@pytest.mark.parametrize("shape_name", ["il_p1_7x10_d32", "norope_p1_7x10_d64", "perhead_half_p0_8x9_d64"])
def test_the_forward_plans_the_fused_backward(shape_name):
    """With the incoming gradient laid out like o, the backward runs the forward's plan: the same gradients, bit for
    bit, as the backward planned there and then."""
    q, k, v, do, table = _inputs(SHAPES[shape_name], torch.float32, "fused", 16)
    *planned, runs = _planned_grads(q, k, v, do, table)
    *unplanned, no_runs = _planned_grads(q, k, v, do, table, plans=False)
    assert (runs, no_runs) == (1, 0)
    for what, a, b in zip(("dq", "dk", "dv"), planned, unplanned):
        assert torch.isfinite(a).all() and a.abs().sum() > 0, f"{what} is not finite or all zero"
        assert torch.equal(a, b), f"{what}: the planned backward differs from the one planned at the backward"


def test_the_packed_backward_runs_the_plan_into_the_projections_gradient():
    """`attention_packed`: the plan holds the strides of qkv's gradient views, which the kernel writes into."""
    s = SHAPES["il_p1_7x10_d32"]
    gen = torch.Generator().manual_seed(19)
    proj0 = torch.randn(s.B, s.N, 3 * s.H * s.D, generator=gen).to(DEVICE)
    do = make_tensor("transposed", s.B, s.H, s.N, s.D, torch.float32, gen)  # laid out like o
    table = make_table(s, gen)

    def grad(plans: bool):
        proj = proj0.detach().requires_grad_()
        with _counting_planned_runs(plans) as ran:
            attnhub.attention_packed(proj.reshape(s.B, s.N, 3, s.H, s.D), table, backend=TRITON).backward(do)
        return proj.grad, len(ran)

    (planned, runs), (unplanned, no_runs) = grad(True), grad(False)
    assert (runs, no_runs) == (1, 0)
    assert torch.isfinite(planned).all() and planned.abs().sum() > 0
    assert torch.equal(planned, unplanned), "the planned packed backward differs from the one planned at the backward"


def test_a_gradient_of_another_layout_takes_the_unplanned_backward():
    """o is laid out [B, N, H, D]; a contiguous [B, H, N, D] gradient (H > 1) is not what the plan holds."""
    q, k, v, _, table = _inputs(SHAPES["il_p1_7x10_d32"], torch.float32, "fused", 17)
    do = make_tensor("contiguous", *q.shape, torch.float32, torch.Generator().manual_seed(17))
    *grads, runs = _planned_grads(q, k, v, do, table)
    ref = run_backend("math", *(t.detach().double() for t in (q, k, v, do)), table)[1:]
    assert runs == 0
    for what, a, r in zip(("dq", "dk", "dv"), grads, ref):
        assert_close_rel(a, r, torch.float32, f"{what} vs math")


def test_settings_and_configs_changed_before_the_backward_are_honoured():
    """The plan holds the backward setting and the configs of its forward: a backward under others plans anew."""
    q, k, v, do, table = _inputs(SHAPES["il_p1_7x10_d32"], torch.float32, "fused", 18)
    with runtime.recording() as recorded:
        *_, runs = _planned_grads(q, k, v, do, table, lambda: settings.override(triton_bwd="split"))
    assert runs == 0 and [x.name for x in recorded if x.name in BWD_KERNELS] == SPLIT_KERNELS
    with runtime.recording() as recorded:
        *_, runs = _planned_grads(q, k, v, do, table, lambda: configs.override(bwd_fused=SINGLE_BLOCK))
    assert runs == 0
    assert [x.constexprs.get("SINGLE_M") for x in recorded if x.name == "bwd_fused_kernel"] == [True]


def test_dimensions_of_size_one_do_not_decide_the_layout():
    """A kernel indexes a dimension of size 1 at 0 only: its stride may be anything."""
    t = torch.empty(1, 1, 5, 4)  # contiguous strides (20, 20, 4, 1)
    assert launch.laid_out(t, (20, 4, 4, 1)) and launch.laid_out(t, (20, 20, 4, 1))
    assert not launch.laid_out(torch.empty(1, 2, 5, 4), (40, 4, 8, 1))
