"""Helpers shared by the tests: input makers, the `Shape` of a test case, running a backend, parity checks.

Inputs are made on `DEVICE` (CUDA when available, else the CPU, where triton_fa_rope runs forced in the Triton
interpreter: conftest sets TRITON_INTERPRET=1). Tolerances come from `attnhub.tolerances`.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import attnhub
from attnhub.registry import REGISTRY
from attnhub.tolerances import bound, rel_l2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = sorted(REGISTRY.specs())  # read at collection: a newly registered backend joins the matrix
TRITON = "triton_fa_rope"


def device_for(backend: str) -> str:
    """Where a test of `backend` runs: triton_fa_rope on the GPU when there is one (on the CPU it runs only in the
    interpreter, which conftest turns on where there is no GPU), the others on the CPU."""
    return DEVICE if backend == TRITON else "cpu"


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
        assert_close_rel(a, b, dtype, f"{name} {what}", grad=what != "o")
        assert a.abs().sum() > 0, f"{name}: {what} is all zero"


def make_learnable_table(s: Shape, gen: torch.Generator, dtype) -> tuple[torch.Tensor, attnhub.CosSinTable]:
    """(emb, table): `make_emb` (per head when the shape says so) as a leaf that requires grad, as learnable
    frequencies give, and the table made from it."""
    emb = make_emb(s, gen, heads=s.per_head, dtype=dtype).requires_grad_()
    return emb, attnhub.CosSinTable.from_sin_cos(emb, prefix_tokens=s.P, layout=s.layout)


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output", *,
                     grad: bool = False) -> None:
    """Fail on a shape mismatch, any non-finite value, or a relative L2 error above `bound(dtype, grad=grad)`."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values in the result"
    err, limit = rel_l2(got, ref), bound(dtype, grad=grad)
    assert err <= limit, f"{what}: relative L2 error {err:.3e} > {limit:.1e} allowed for {dtype}"


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_grads(got: dict, ref: dict, dtype) -> None:
    """Per-parameter gradients (name -> tensor or None) of two models agree: the same names, None and zero where
    the reference has them, else within the bound of `dtype`."""
    assert ref.keys() == got.keys()
    for name, g in ref.items():
        if g is None:
            assert got[name] is None, f"{name}: gradient only in the patched model"
        elif g.norm() == 0:
            assert got[name].norm() == 0, f"{name}: gradient should be zero"
        else:
            assert_close_rel(got[name], g, dtype, f"grad {name}")


def load_script(name: str):
    """A script of benchmarks/ (no package there) imported as a module, e.g. load_script("sweep")."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan_as_compiled(monkeypatch) -> None:
    """triton_fa_rope plans as compiled code does (on CPU the interpreter takes no Gluon kernel) for the test, with a
    cache of its compile-time parameters of its own: they depend on INTERPRET (bf16 dots compiled, fp32 in the
    interpreter, triton#11584), and the shared cache would hand compiled ones to the interpreter tests after it."""
    from attnhub.backends.triton_fa_rope import launch

    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "_meta_for", functools.lru_cache(maxsize=None)(launch._meta_for.__wrapped__))


def resident_kernel(config=None) -> str:
    """The name of the resident Gluon forward (N <= 256) that `config` (default: Hopper's table at D = 64) runs: its
    warp-specialized form where `resident_warp_specialized` is on."""
    from attnhub.backends.triton_fa_rope import configs

    config = config or configs.for_arch(9, 64)
    return "resident_ws_fwd_kernel" if config.resident_warp_specialized else "resident_fwd_kernel"
