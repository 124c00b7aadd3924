"""Tolerances, in one place: relative L2 error ||got - ref|| / ||ref|| against a float64 reference, per dtype.

A backend output in `dtype` is compared with `math` run in float64 on the same inputs (upcast). The bounds are
a few times the error of one rounding of the output plus accumulation in fp32 (fp16/bf16 kernels accumulate in
fp32; softmax, LSE and RoPE are computed in fp32 by every backend).
"""

from __future__ import annotations

import torch

REL_L2 = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    """Fail on a shape mismatch, any non-finite value, or a relative L2 error above REL_L2[dtype]."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values in the result"
    err, bound = rel_l2(got, ref), REL_L2[dtype]
    assert err <= bound, f"{what}: relative L2 error {err:.3e} > {bound:.1e} allowed for {dtype}"
