"""How far an attention result may be from the exact one: the one tolerance table of attnhub.

The tests, `python -m attnhub check` and `python -m attnhub bench` all read it. A bound is a relative L2 error
||got - ref|| / ||ref|| of a result in `dtype` against a float64 reference computed on the same (upcast) inputs.
The bounds are a few times the error of one rounding of the output plus accumulation in fp32 (fp16/bf16 kernels
accumulate in fp32; softmax, LSE and RoPE are computed in fp32 by every backend).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Bound(NamedTuple):
    """Relative L2 bounds of one dtype: the forward output o, and the gradients dq, dk, dv (and the table's)."""

    fwd: float
    grad: float


REL_L2: dict[torch.dtype, Bound] = {
    torch.float64: Bound(fwd=1e-12, grad=1e-12),
    torch.float32: Bound(fwd=1e-5, grad=1e-5),
    torch.float16: Bound(fwd=2e-3, grad=2e-3),
    torch.bfloat16: Bound(fwd=1.6e-2, grad=1.6e-2),
}


def bound(dtype: torch.dtype, *, grad: bool = False) -> float:
    """The largest relative L2 error against float64 accepted for a result in `dtype` (a gradient with `grad`)."""
    b = REL_L2[dtype]
    return b.grad if grad else b.fwd


def bound_between(dtype: torch.dtype, *, grad: bool = False) -> float:
    """The largest relative L2 difference accepted between two implementations that both compute in `dtype`.

    Each may be `bound(dtype)` from the exact result, so by the triangle inequality they may differ by twice that.
    """
    return 2 * bound(dtype, grad=grad)


def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref||, computed in float64 (0 / 0 counts as 0; NaN anywhere gives NaN)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))
