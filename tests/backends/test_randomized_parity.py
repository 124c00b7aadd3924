"""Randomized parity (hypothesis): random shapes, RoPE layouts, memory layouts and dtypes; every backend that can
run the call here against `math` in float64, forward output and dq, dk, dv. A second test draws the arguments of
variable-resolution batches (key padding masks, grouped k/v heads, per-sample and coordinate tables) and checks
every backend that can run them against the explicit reference of `test_varlen_parity`.

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
from tests.backends.test_varlen_parity import Case, _axial, _coords_table, _emb_table, _random_mask, check
from tests.helpers import Shape, available, check_parity, make_qkv, make_table, make_tensor

EXAMPLES = int(os.environ.get("ATTNHUB_HYPOTHESIS_EXAMPLES", "25"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["contiguous", "transposed", "fused", "every_other"]


SETTINGS = dict(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=None,
    # conftest's autouse fixture only isolates the tuning cache and registry: sharing it across examples is fine
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@settings(**SETTINGS)
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


VARLEN_TABLES = ["none", "axial", "emb_per_sample", "emb_per_sample_head", "coords", "coords_per_sample"]


@settings(**SETTINGS)
@given(
    B=st.integers(1, 3),
    H_kv=st.integers(1, 3),
    group=st.integers(1, 3),
    gh=st.integers(1, 4),
    gw=st.integers(1, 4),
    P=st.integers(0, 3),
    D=st.sampled_from([16, 32]),
    table=st.sampled_from(VARLEN_TABLES),
    layout=st.sampled_from(["interleaved", "half"]),
    p_valid=st.sampled_from([None, 0.0, 0.3, 0.8, 1.0]),  # None: no mask; 0.0: only prefix tokens valid
    seed=st.integers(0, 2**31 - 1),
)
def test_random_varlen_call_matches_reference(B, H_kv, group, gh, gw, P, D, table, layout, p_valid, seed):
    P = max(P, 2 - gh * gw)  # N >= 2, as above
    n = gh * gw
    if table == "emb_per_sample_head":  # a per-head table is refused with grouped k/v heads
        group = 1
    H = H_kv * group
    g = torch.Generator().manual_seed(seed)
    make = {
        "none": lambda dtype: (None, None),
        "axial": _axial((gh, gw), D, P, layout),
        "emb_per_sample": _emb_table(B, None, n, D, P, layout, seed),
        "emb_per_sample_head": _emb_table(B, H, n, D, P, layout, seed),
        "coords": _coords_table(torch.rand(n, 2, generator=g, dtype=torch.float64) * 6,
                                torch.randn(D // 2, 2, generator=g, dtype=torch.float64), P, layout),
        "coords_per_sample": _coords_table(torch.rand(B, n, 2, generator=g, dtype=torch.float64) * 6,
                                           torch.randn(H, D // 2, 2, generator=g, dtype=torch.float64)
                                           if group == 1 else torch.randn(D // 2, 2, generator=g,
                                                                          dtype=torch.float64), P, layout),
    }[table]
    mask = None if p_valid is None else _random_mask(B, P + n, P, seed % 1000, p_valid)
    ran = [name for name in sorted(REGISTRY.specs()) if check(name, Case(B, H, H_kv, P + n, D, mask, make), seed,
                                                               skip=False)]
    assert "math" in ran, "math (the reference backend) must run every call"
