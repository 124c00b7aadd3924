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

import pytest
import torch

from attnhub import settings
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import configs
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
