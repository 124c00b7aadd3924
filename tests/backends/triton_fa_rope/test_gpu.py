"""triton_fa_rope on a CUDA GPU (compiled kernels, bf16 included): parity with math in float64, large shapes.

Run on the lent H100: `pytest -m gpu`. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import attnhub
from attnhub import settings
from tests.helpers import assert_close_rel

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _run(backend, q, k, v, do, table):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = attnhub.attention(q, k, v, table, backend=backend)
    torch.cuda.synchronize()
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def _check(q, k, v, table, dtype):
    do = torch.randn(q.shape, device=q.device, dtype=dtype)
    got = _run("triton_fa_rope", q, k, v, do, table)
    ref = _run("math", q.double(), k.double(), v.double(), do.double(), table)
    for what, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        assert a.dtype == dtype
        assert_close_rel(a, b, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,H,grid,P,D,layout",
    [
        (2, 6, (14, 14), 1, 64, "interleaved"),  # ViT-S/16@224, short sequence
        (1, 3, (24, 24), 1, 64, "interleaved"),  # ViT-B/16@384, general path
        (1, 2, (32, 32), 5, 64, "interleaved"),  # CLS + 4 registers at 512 px
        (2, 4, (14, 14), 5, 64, "half"),  # DINOv3 style
        (2, 2, (7, 11), 0, 32, "interleaved"),  # non-square, no prefix, small head
        (1, 2, (16, 16), 1, 128, "half"),
        (1, 2, (9, 9), 1, 80, "interleaved"),  # D/2 not a power of two (ViT-H heads)
        (2, 3, (14, 14), 1, 64, None),
    ],
)
def test_parity(B, H, grid, P, D, layout, dtype):
    N = P + grid[0] * grid[1]
    table = None if layout is None else attnhub.CosSinTable(
        grid=grid, head_dim=D, prefix_tokens=P, layout=layout, device="cuda")
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
    _check(q, k, v, table, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_fused_qkv_views_and_per_head_table(dtype):
    """q, k, v as strided views of one [B, N, 3, H, D] projection; one table per head (RoPE-Mixed)."""
    B, H, g, P, D = 2, 6, 14, 1, 64
    N = P + g * g
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    emb = torch.randn(H, g * g, D // 2, device="cuda", dtype=torch.float32) * 3
    emb = torch.cat([emb.sin().repeat_interleave(2, -1), emb.cos().repeat_interleave(2, -1)], -1)
    table = attnhub.CosSinTable.from_sin_cos(emb, prefix_tokens=P)
    _check(q, k, v, table, dtype)


def test_deterministic_backward():
    B, H, g, D = 4, 6, 14, 64
    table = attnhub.CosSinTable(grid=(g, g), head_dim=D, device="cuda")
    q, k, v = (torch.randn(B, H, 1 + g * g, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    first = _run("triton_fa_rope", q, k, v, do, table)
    second = _run("triton_fa_rope", q, k, v, do, table)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _chunked_reference_check(q, k, v, o, table, bh_index):
    """Compare selected (b, h) slices of o with math in float64."""
    B, H = q.shape[:2]
    for idx in bh_index:
        b, h = divmod(idx, H)
        sl = (slice(b, b + 1), slice(h, h + 1))
        tab = table
        ref = attnhub.attention(q[sl].double(), k[sl].double(), v[sl].double(), tab, backend="math")
        assert_close_rel(o[sl], ref, q.dtype, f"o[{b},{h}]")


def test_grid_beyond_65535_programs_per_axis():
    """B*H = 70,400 (b, h) pairs: more than launch-grid axes 1/2 allow; forward and backward."""
    B, H, g, D = 1100, 64, 4, 32
    table = attnhub.CosSinTable(grid=(g, g), head_dim=D, device="cuda")
    q, k, v = (torch.randn(B, H, 1 + g * g, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    o = attnhub.attention(q, k, v, table, backend="triton_fa_rope")
    o.backward(torch.randn_like(o))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    _chunked_reference_check(q.detach(), k.detach(), v.detach(), o.detach(), table, [0, 1, 70_399, 35_123])


def test_more_than_2_31_elements():
    """q, k, v of 2^31 + elements each: offsets past 2^31 need 64-bit arithmetic (checked at the far end)."""
    H, g, P, D = 16, 16, 1, 128
    B = 2**31 // (H * (P + g * g) * D) + 2  # 4082: 2.15e9 elements, 4.3 GB per bf16 tensor
    table = attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P, device="cuda")
    q, k, v = (torch.randn(B, H, P + g * g, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert q.numel() > 2**31
    with torch.no_grad():
        o = attnhub.attention(q, k, v, table, backend="triton_fa_rope")
    _chunked_reference_check(q, k, v, o, table, [0, B * H - 1, B * H - 2, (B * H) // 2])


def test_long_sequence_4096():
    B, H, g, D = 1, 4, 64, 64
    table = attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=0, device="cuda")
    q, k, v = (torch.randn(B, H, g * g, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    _check(q, k, v, table, torch.bfloat16)


def test_automatic_choice_is_triton_on_gpu():
    """On the GPU a bf16 RoPE call goes to a Triton backend (which one: the measured table, measured.yaml)."""
    table = attnhub.CosSinTable(grid=(14, 14), head_dim=64, device="cuda")
    q = torch.randn(2, 6, 197, 64, device="cuda", dtype=torch.bfloat16)
    assert attnhub.explain(q, q, q, table).chosen in ("triton_fa_rope", "triton_rope_sdpa")
    assert attnhub.explain(q.double(), q.double(), q.double(), table).chosen == "torch_sdpa"


@pytest.mark.parametrize("path", ["split", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,grid,P,layout", [(2, 6, (14, 14), 1, "interleaved"), (1, 3, (24, 24), 5, "half")])
def test_both_backward_paths(B, H, grid, P, layout, dtype, path):
    """The split (default) and the fused (ATTNHUB_TRITON_BWD=fused) backward, compiled, against float64 math."""
    N, D = P + grid[0] * grid[1], 64
    table = attnhub.CosSinTable(grid=grid, head_dim=D, prefix_tokens=P, layout=layout, device="cuda")
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
    with settings.override(triton_bwd=path):
        _check(q, k, v, table, dtype)


def test_relaunch_through_the_cached_compiled_kernel_is_bitwise_equal():
    """The second call of a shape launches the compiled kernels `runtime.launch` keeps (not `kernel[grid]`): same
    bits."""
    import triton

    from attnhub.backends import _triton_runtime as runtime

    if not runtime.KEEPS_RUNNERS:
        pytest.skip(f"triton {triton.__version__}: launches go through kernel[grid] only")
    table = attnhub.CosSinTable(grid=(14, 14), head_dim=64, device="cuda")
    q, k, v = (torch.randn(2, 6, 197, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    with runtime.fresh_caches() as state:
        first = _run("triton_fa_rope", q, k, v, do, table)
        assert state.runners, "no launch was kept"
        hits = []  # launches through the kept kernels
        runners = dict(state.runners)
        # the driver's launches off: each kept launch goes through the counting runner
        state.runners.update({key: (_Counting(compiled, hits), tail, None)
                              for key, (compiled, tail, _) in runners.items()})
        again = _run("triton_fa_rope", q, k, v, do, table)
        assert set(state.runners) == set(runners) and len(hits) >= len(runners)  # no launch missed the kept ones
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    _check(q, k, v, table, torch.bfloat16)


class _Counting:
    """A kept compiled kernel that counts its launches, through `compiled[grid]` or its launcher `compiled.run`."""

    def __init__(self, compiled, hits):
        self.compiled, self.hits = compiled, hits

    def __getitem__(self, grid):
        self.hits.append(grid)
        return self.compiled[grid]

    def __getattr__(self, name):  # function, packed_metadata, ...
        return getattr(self.compiled, name)

    @property
    def run(self):
        def counted(*args):
            self.hits.append(args[:3])
            return self.compiled.run(*args)

        return counted
