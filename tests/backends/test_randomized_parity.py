"""Randomized parity (hypothesis): random shapes, RoPE layouts, memory layouts and dtypes; every backend that can
run the call here against `math` in float64, forward output and dq, dk, dv.

Drawn: B, H in 1..3; a gh x gw grid (1..5 each) after 0..5 prefix tokens (N >= 2); D in {16, 32, 64, 128}
(2D axial RoPE needs D % 4 == 0, triton_fa_rope D >= 16); RoPE layout interleaved, half or none; q, k, v (and the
upstream grad) contiguous, a [B, N, H, D] tensor transposed, views of a fused [B, N, 3, H, D] qkv projection, or
every other token of a [B, H, 2N, D] tensor; float32, float16 or bfloat16.

Which backends run is decided by `attnhub.explain(..., backend=name)` (forced, so triton_fa_rope runs in the
CPU interpreter too). The device is CUDA when available.

Examples are derandomized (the same every run). `ATTNHUB_HYPOTHESIS_EXAMPLES=N` sets their number (default 25,
which keeps CPU CI fast); the GPU run uses more, e.g. `ATTNHUB_HYPOTHESIS_EXAMPLES=100 pytest
tests/backends/test_randomized_parity.py`. On CUDA most examples compile new Triton specializations (shape,
dtype, layout, strides): 200 examples did not finish in 6 minutes on an H100, so budget minutes per 100.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnhub.registry import REGISTRY
from tests.helpers import Shape, available, check_parity, make_qkv, make_table, make_tensor

EXAMPLES = int(os.environ.get("ATTNHUB_HYPOTHESIS_EXAMPLES", "25"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["contiguous", "transposed", "fused", "every_other"]


@settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=None,
    # conftest's autouse fixture only isolates the tuning cache and registry: sharing it across examples is fine
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 3),
    gh=st.integers(1, 5),
    gw=st.integers(1, 5),
    P=st.integers(0, 5),
    D=st.sampled_from([16, 32, 64, 128]),
    layout=st.sampled_from(["interleaved", "half", None]),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_call_matches_math(B, H, gh, gw, P, D, layout, kind, dtype, seed):
    # N >= 2: softmax over a single key is constant, so dq = dk = 0 and a relative error would be meaningless
    shape = Shape(B, H, (gh, gw), max(P, 2 - gh * gw), D, layout)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(kind, B, H, shape.N, D, dtype, gen)
    do = make_tensor("transposed" if kind == "fused" else kind, B, H, shape.N, D, dtype, gen)
    table = make_table(shape, gen)
    ran = []
    for name in sorted(REGISTRY.specs()):
        if available(name, q.detach().requires_grad_(), k, v, table):
            continue
        check_parity(name, q, k, v, do, table)
        ran.append(name)
    assert "math" in ran, "math (the reference) must run every call"
