"""Cross-backend parity: every registered backend against `math` in float64, forward output and dq, dk, dv.

A covering design rather than the full product (the Triton interpreter is slow on CPU):
- every shape in `SHAPES` with every backend in float32, contiguous inputs;
- float16 (every backend) and bfloat16 (backends other than triton_fa_rope under the interpreter,
  triton-lang/triton#11584) on the `HALF_SHAPES` subset;
- strided inputs (`STRIDES`: views of a fused qkv projection, [B, N, H, D] transposed, a non-unit stride on D)
  on the `STRIDED_SHAPES` subset, float32 and float16.

On CPU triton_fa_rope is forced and runs in the interpreter (conftest sets TRITON_INTERPRET=1); with CUDA the same
tests run on the GPU. The helpers `make_qkv`, `make_table`, `available`, `run_backend` and `check_parity` are
shared with the other parity tests of this folder.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnhub
from attnhub.registry import REGISTRY
from tests.tolerances import assert_close_rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = sorted(REGISTRY.specs())  # read at collection: a newly registered backend joins the matrix
TRITON = "triton_fa_rope"


# --------------------------------------------------------------------------------------------------- helpers
@dataclasses.dataclass(frozen=True)
class Shape:
    """q: [B, H, P + gh*gw, D]; k, v: the same N, or `n_kv` tokens (cross-attention, rope None)."""

    B: int
    H: int
    grid: tuple[int, int]
    P: int
    D: int
    layout: str | None  # "interleaved", "half" or None (no RoPE)
    per_head: bool = False  # a [H, N_grid, D/2] table built with from_sin_cos
    n_kv: int | None = None

    @property
    def N(self) -> int:
        return self.P + self.grid[0] * self.grid[1]


def make_tensor(kind: str, B: int, H: int, N: int, D: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """A [B, H, N, D] tensor of random values with the memory layout `kind`:

    contiguous: [B, H, N, D]; transposed: a [B, N, H, D] tensor transposed; d_strided: a [B, H, D, N] tensor
    transposed (stride of D != 1); every_other: every second token of a [B, H, 2N, D] tensor.
    """
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)

    if kind == "contiguous":
        return rnd(B, H, N, D)
    if kind == "transposed":
        return rnd(B, N, H, D).transpose(1, 2)
    if kind == "d_strided":
        return rnd(B, H, D, N).transpose(2, 3)
    if kind == "every_other":
        return rnd(B, H, 2 * N, D)[:, :, ::2]
    raise ValueError(f"unknown stride kind {kind!r}")


def make_qkv(kind: str, B: int, H: int, N: int, D: int, dtype, gen: torch.Generator, n_kv: int | None = None):
    """q: [B, H, N, D], k, v: [B, H, n_kv or N, D] with layout `kind` (see `make_tensor`), or "fused": views of
    one [B, N, 3, H, D] projection permuted to [B, H, N, D] (the timm Attention layout)."""
    n_kv = N if n_kv is None else n_kv
    if kind == "fused":
        assert n_kv == N, "a fused qkv projection has one sequence length"
        qkv = torch.randn(B, N, 3, H, D, generator=gen).to(device=DEVICE, dtype=dtype)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return (make_tensor(kind, B, H, N, D, dtype, gen), make_tensor(kind, B, H, n_kv, D, dtype, gen),
            make_tensor(kind, B, H, n_kv, D, dtype, gen))


def make_table(shape: Shape, gen: torch.Generator) -> attnhub.CosSinTable | None:
    """The RoPE table of `shape`: axial (shared by heads), or per head from random angles via from_sin_cos."""
    if shape.layout is None:
        return None
    if not shape.per_head:
        return attnhub.CosSinTable(grid=shape.grid, head_dim=shape.D, prefix_tokens=shape.P,
                                   layout=shape.layout, device=DEVICE)
    return attnhub.CosSinTable.from_sin_cos(make_emb(shape, gen, heads=True), prefix_tokens=shape.P,
                                            layout=shape.layout)


def make_emb(shape: Shape, gen: torch.Generator, heads: bool, dtype=torch.float32) -> torch.Tensor:
    """timm's cat(sin, cos) embedding of random angles: [H, N_grid, 2D] with `heads`, else [N_grid, 2D]."""
    n = shape.grid[0] * shape.grid[1]
    ang = torch.rand(*((shape.H,) if heads else ()), n, shape.D // 2, generator=gen) * 6.0  # [(H,) N_grid, D/2]
    if shape.layout == "interleaved":  # channels (2j, 2j+1) share angle j
        ang = ang.repeat_interleave(2, dim=-1)
    else:  # channels (j, j + D/2) share angle j
        ang = torch.cat([ang, ang], dim=-1)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).to(device=DEVICE, dtype=dtype)


def available(name: str, q, k, v, table) -> str:
    """Why backend `name` cannot run this call when forced ("" when it can), from `attnhub.explain`."""
    if name == TRITON and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "the Triton CPU interpreter computes bfloat16 tl.dot wrongly (triton-lang/triton#11584)"
    try:
        reasons = attnhub.explain(q, k, v, table, backend=name).reasons[name]
    except attnhub.BackendUnavailableError as exc:
        return str(exc)
    return "; ".join(reasons)


def run_backend(name: str, q, k, v, do, table):
    """o and dq, dk, dv of backend `name` (fresh leaves with the strides of q, k, v; upstream grad `do`)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = attnhub.attention(q, k, v, table, backend=name)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def check_parity(name: str, q, k, v, do, table) -> None:
    """Backend `name` in q's dtype against `math` in float64 on upcast copies of the same inputs and `do`."""
    dtype = q.dtype
    why = available(name, q.detach().requires_grad_(), k, v, table)
    if why:
        pytest.skip(f"{name} cannot run this call here: {why}")
    got = run_backend(name, q, k, v, do, table)
    ref = run_backend("math", *(t.detach().double() for t in (q, k, v, do)), table)
    B, H, N, D = q.shape
    assert got[0].shape == (B, H, N, D), f"{name}: output shape {tuple(got[0].shape)} != {(B, H, N, D)}"
    for what, a, b, x in zip(("o", "dq", "dk", "dv"), got, ref, (q, q, k, v)):
        assert a is not None, f"{name}: no {what} (the gradient did not reach the input)"
        assert a.dtype == dtype, f"{name}: {what} has dtype {a.dtype}, inputs are {dtype}"
        assert a.shape == x.shape, f"{name}: {what} has shape {tuple(a.shape)}, expected {tuple(x.shape)}"
        assert_close_rel(a, b, dtype, f"{name} {what}")
        assert a.abs().sum() > 0, f"{name}: {what} is all zero"


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


def make_learnable_table(s: Shape, gen: torch.Generator, dtype) -> tuple[torch.Tensor, attnhub.CosSinTable]:
    """(emb, table): `make_emb` (per head when the shape says so) as a leaf that requires grad, as learnable
    frequencies give, and the table made from it."""
    emb = make_emb(s, gen, heads=s.per_head, dtype=dtype).requires_grad_()
    return emb, attnhub.CosSinTable.from_sin_cos(emb, prefix_tokens=s.P, layout=s.layout)


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
        assert_close_rel(a, b, torch.float32, f"{name} {what}")
