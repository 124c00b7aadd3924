"""Cross-backend parity: every registered backend against `math` in float64, forward output and dq, dk, dv.

A covering design rather than the full product (the Triton interpreter is slow on CPU):
- every shape in `SHAPES` with every backend in float32, contiguous inputs;
- float16 and bfloat16 on the `HALF_SHAPES` subset (triton_fa_rope included: under the interpreter it computes
  bfloat16 dots in fp32, since the interpreter's bf16 tl.dot is wrong, triton-lang/triton#11584);
- strided inputs (`STRIDES`: views of a fused qkv projection, [B, N, H, D] transposed, a non-unit stride on D)
  on the `STRIDED_SHAPES` subset, float32 and float16.

On CPU triton_fa_rope is forced and runs in the interpreter (conftest sets TRITON_INTERPRET=1); with CUDA the same
tests run on the GPU. The helpers (`make_qkv`, `make_table`, `check_parity`, ...) live in tests/helpers.py.
"""

from __future__ import annotations

import pytest
import torch

import attnhub
from attnhub.registry import REGISTRY
from tests.helpers import (
    BACKENDS, Shape, assert_close_rel, check_parity, make_learnable_table, make_qkv, make_table, make_tensor,
)

# ------------------------------------------------------------------------------------------------- the matrix
SHAPES = {
    "cls_4x4_d32_interleaved": Shape(1, 1, (4, 4), 1, 32, "interleaved"),
    "noprefix_4x4_d64_half": Shape(2, 3, (4, 4), 0, 64, "half"),
    "reg5_4x4_d32_half": Shape(3, 2, (4, 4), 5, 32, "half"),
    "reg5_4x4_d64_interleaved": Shape(1, 2, (4, 4), 5, 64, "interleaved"),
    "cls_3x5_d64_interleaved": Shape(2, 3, (3, 5), 1, 64, "interleaved"),
    "noprefix_3x5_d32_half": Shape(3, 2, (3, 5), 0, 32, "half"),
    "cls_4x4_d64_norope": Shape(3, 2, (4, 4), 1, 64, None),
    "cls_3x3_d48_interleaved": Shape(1, 2, (3, 3), 1, 48, "interleaved"),  # D/2 not a power of two
    "cls_5x7_d32_interleaved": Shape(1, 2, (5, 7), 1, 32, "interleaved"),  # N = 36: several K/V tiles
    "perhead_3x5_d32_interleaved": Shape(2, 3, (3, 5), 1, 32, "interleaved", per_head=True),
    "perhead_4x4_d64_half": Shape(1, 2, (4, 4), 1, 64, "half", per_head=True),
    "cross_17x9_d64": Shape(2, 3, (4, 4), 1, 64, None, n_kv=9),
    "cross_10x45_d32": Shape(1, 2, (3, 3), 1, 32, None, n_kv=45),  # N_kv past one K/V tile
}
HALF_SHAPES = ["cls_4x4_d32_interleaved", "noprefix_4x4_d64_half", "cls_3x5_d64_interleaved",
               "cls_4x4_d64_norope", "perhead_3x5_d32_interleaved", "cross_17x9_d64"]
STRIDED_SHAPES = ["reg5_4x4_d64_interleaved", "noprefix_3x5_d32_half", "cls_4x4_d64_norope"]
STRIDES = ["fused", "transposed", "d_strided"]


def _check_shape(name: str, shape_name: str, dtype, kind: str, seed: int) -> None:
    s = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(kind, s.B, s.H, s.N, s.D, dtype, gen, s.n_kv)
    if kind != "contiguous":
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous()), f"{kind}: inputs are contiguous"
    # the upstream grad has the inputs' layout too (fused: [B, N, H, D] memory, like o.transpose(1, 2) in timm)
    do = make_tensor("transposed" if kind == "fused" else kind, s.B, s.H, s.N, s.D, dtype, gen)
    check_parity(name, q, k, v, do, make_table(s, gen))


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("name", BACKENDS)
def test_float32(name, shape_name):
    _check_shape(name, shape_name, torch.float32, "contiguous", seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape_name", HALF_SHAPES)
@pytest.mark.parametrize("name", BACKENDS)
def test_half(name, shape_name, dtype):
    _check_shape(name, shape_name, dtype, "contiguous", seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", STRIDES)
@pytest.mark.parametrize("shape_name", STRIDED_SHAPES)
@pytest.mark.parametrize("name", BACKENDS)
def test_strided(name, shape_name, kind, dtype):
    _check_shape(name, shape_name, dtype, kind, seed=3)


# ------------------------------------------------------------------------------------ gradient into the table
TABLE_GRAD_SHAPES = ["cls_3x5_d64_interleaved", "noprefix_4x4_d64_half", "reg5_4x4_d32_half",
                     "perhead_3x5_d32_interleaved", "perhead_4x4_d64_half"]


@pytest.mark.parametrize("qkv_grad", [True, False], ids=["qkv_and_table", "table_only"])
@pytest.mark.parametrize("shape_name", TABLE_GRAD_SHAPES)
@pytest.mark.parametrize("name", BACKENDS)
def test_table_gradient(name, shape_name, qkv_grad):
    """d loss / d emb through the table (learnable RoPE frequencies), float32 against math in float64; with
    q, k, v requiring grad or not."""
    s = SHAPES[shape_name]
    if not REGISTRY.specs()[name].rope_grad:
        pytest.skip(f"{name} declares no gradient into the table")
    gen = torch.Generator().manual_seed(31)
    q, k, v = make_qkv("transposed", s.B, s.H, s.N, s.D, torch.float32, gen)
    do = make_tensor("contiguous", s.B, s.H, s.N, s.D, torch.float32, gen)
    state = gen.get_state()
    grads = {}
    for backend, dtype in ((name, torch.float32), ("math", torch.float64)):
        gen.set_state(state)
        emb, table = make_learnable_table(s, gen, dtype)
        x = [t.detach().to(dtype, copy=True).requires_grad_(qkv_grad) for t in (q, k, v)]
        attnhub.attention(*x, table, backend=backend).backward(do.to(dtype))
        grads[backend] = [emb.grad, *(t.grad for t in x)]
    for what, a, b in zip(("emb", "dq", "dk", "dv"), grads[name], grads["math"]):
        if not qkv_grad and what != "emb":
            assert a is None and b is None, f"{name}: {what} computed though q, k, v need no grad"
            continue
        assert a is not None and a.abs().sum() > 0, f"{name}: no gradient reached {what}"
        assert_close_rel(a, b, torch.float32, f"{name} {what}", grad=True)
