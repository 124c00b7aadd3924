"""NaN and inf inputs: `math` defines the result; every backend must give exactly its NaN pattern.

What `math` gives (softmax over the scores of one query row, then the weighted sum of v):
- NaN in q[b, h, i, c]: the scores of row i are NaN, so o[b, h, i, :] is all NaN; every other row is finite.
- NaN in k[b, h, j, c]: every row attends to key j, so all of o[b, h] is NaN; other (b, h) are finite.
- NaN in v[b, h, j, c]: only channel c of v is touched, so o[b, h, :, c] is NaN (every row) and the rest finite.
- +inf or -inf in q[b, h, i, c]: the scores of row i are +-inf. If one is +inf, softmax computes inf - inf; if all
  are -inf, 0 / 0. Either way o[b, h, i, :] is all NaN and every other row is finite.
For the NaN cases the NaN masks of dq, dk, dv must equal math's too; for inf only the forward is compared.

PyTorch's SDPA alone returns 0, not NaN, for a row whose scores are all -inf (its convention for fully masked
rows), and in float16/bfloat16 on CPU also for a row that mixes +inf and -inf scores when N is a multiple of 16;
the torch_sdpa backend restores math's NaN (see backends/torch_sdpa.py), and these tests hold it to that.
"""

from __future__ import annotations

import pytest
import torch

import attnhub
from tests.helpers import BACKENDS, DEVICE, available, run_backend

# the Triton interpreter (numpy) warns on the NaNs these tests make on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
NAN, INF = float("nan"), float("inf")
B, H, P, GRID, D = 2, 2, 1, (3, 5), 32  # N = 16
N = P + GRID[0] * GRID[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _inputs(dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, N, D, generator=gen).to(device=DEVICE, dtype=dtype) for _ in range(4))
    return q, k, v, do


def _table(layout: str | None):
    if layout is None:
        return None
    return attnhub.CosSinTable(grid=GRID, head_dim=D, prefix_tokens=P, layout=layout, device=DEVICE)


def _run_all(name, q, k, v, do, table):
    """(o, dq, dk, dv) of backend `name` and of math on the same inputs (skip when `name` cannot run here)."""
    why = available(name, q.detach().requires_grad_(), k, v, table)
    if why:
        pytest.skip(f"{name} cannot run this call here: {why}")
    return run_backend(name, q, k, v, do, table), run_backend("math", q, k, v, do, table)


def _assert_same_nan(got, ref, whats=("o", "dq", "dk", "dv")):
    for what, a, b in zip(whats, got, ref):
        diff = (torch.isnan(a) != torch.isnan(b)).nonzero().tolist()
        assert not diff, f"{what}: NaN pattern differs from math at {len(diff)} places, first {diff[:4]}"


# NaN in one element of q, k or v: (seed, the input, the element, the region of o that must be NaN (the rest finite),
# the RoPE layout of the case with a table). The k element is on the CLS key, which RoPE does not rotate.
NAN_CASES = {
    "q_poisons_its_row": (10, "q", (1, 0, 7, 3), (1, 0, 7), "interleaved"),  # a patch token's query
    "k_poisons_its_head": (11, "k", (0, 1, 0, 5), (0, 1), "interleaved"),  # every row attends to the NaN key
    "v_poisons_its_channel": (12, "v", (1, 1, 9, 17), (1, 1, slice(None), 17), "half"),  # only channel 17 is read
}


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norope"])
@pytest.mark.parametrize("case", list(NAN_CASES))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", BACKENDS)
def test_nan_input(name, dtype, case, rope):
    seed, where, index, region, layout = NAN_CASES[case]
    q, k, v, do = _inputs(dtype, seed)
    {"q": q, "k": k, "v": v}[where][index] = NAN
    got, ref = _run_all(name, q, k, v, do, _table(layout if rope else None))
    expected = torch.zeros(B, H, N, D, dtype=torch.bool, device=DEVICE)
    expected[region] = True
    o = got[0]
    assert torch.equal(torch.isnan(o), expected), f"{case}: o must be NaN exactly at {region}"
    assert torch.isfinite(o[~expected]).all(), f"{case}: o must be finite outside {region}"
    _assert_same_nan(got, ref)


@pytest.mark.parametrize(
    "scores,sign,layout",
    [("mixed", 1.0, "interleaved"), ("mixed", -1.0, None), ("all_neg_inf", 1.0, None),
     ("all_neg_inf", -1.0, "interleaved")],
    ids=["mixed-+inf-interleaved", "mixed--inf-none", "all_neg_inf-+inf-none", "all_neg_inf--inf-interleaved"],
)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name", BACKENDS)
def test_inf_in_q_gives_nan_row(name, dtype, scores, sign, layout):
    """An infinite query channel (on the CLS token, which RoPE leaves as is) makes its row of o NaN (forward only).

    mixed: random keys, so row 0 has +inf and -inf scores; all_neg_inf: channel c of every key (after RoPE)
    has the sign opposite to the inf, so every score of row 0 is -inf.
    """
    q, k, v, _ = _inputs(dtype, seed=13)
    table = _table(layout)
    c = 4
    q[0, 1, 0, c] = sign * INF
    if scores == "all_neg_inf":
        # rotated channel c of a key mixes channels c and c + 1 (interleaved pair c // 2): make them (-s |x|, 0)
        k[0, 1, :, c] = -sign * (k[0, 1, :, c].abs() + 0.5)
        k[0, 1, :, c + 1] = 0.0
        if table is not None:  # rotated channel c is then -s |x| cos(angle): needs cos > 0 on every patch token
            assert (table.cos[:, c // 2] > 0).all(), "the test needs cos > 0 for rotary pair c // 2"
    why = available(name, q, k, v, table)
    if why:
        pytest.skip(f"{name} cannot run this call here: {why}")
    o = attnhub.attention(q, k, v, table, backend=name)
    o_ref = attnhub.attention(q, k, v, table, backend="math")
    assert torch.isnan(o_ref[0, 1, 0]).all(), "math: the row of the infinite query is NaN"
    rest = torch.ones(B, H, N, dtype=torch.bool, device=DEVICE)
    rest[0, 1, 0] = False
    assert torch.isfinite(o_ref[rest]).all(), "math: every other row is finite"
    _assert_same_nan((o,), (o_ref,), whats=("o",))
