"""triton_fa_rope forward paths: RoPE inside the attention kernel or K / q and K rotated first
(`_rotate_kernel`), and the narrow last K tile.

Each path is forced by editing the launcher's config (`prerotate`: (inference, training), `narrow_tail`) and
compared with `math` in float64: output without grad, output and dq, dk, dv with grad. Every `torch.empty` buffer
is filled with NaN first (conftest's `nan_empty`), so a kernel that leaves part of its output unwritten fails.
On CPU the interpreter runs them in float32 (blocks of 32: N = 71 and 65 leave 7 and 1 keys for the last tile);
with CUDA the compiled kernels in bfloat16 and float16.
"""

from __future__ import annotations

import pytest
import torch

from attnhub.backends import triton_fa_rope as T
from tests.backends.test_parity import DEVICE, TRITON, Shape, available, make_qkv, make_table, make_tensor, run_backend
from tests.tolerances import assert_close_rel

SHAPES = {
    "il_p1_7x10_d64": Shape(1, 2, (7, 10), 1, 64, "interleaved"),  # N = 71
    "half_p1_8x8_d32": Shape(2, 1, (8, 8), 1, 32, "half"),  # N = 65: a last tile of one key
    "il_p5_6x12_d48": Shape(1, 2, (6, 12), 5, 48, "interleaved"),  # HEAD_D != BLOCK_D: pair loads
    "perhead_il_p0_8x9_d32": Shape(1, 2, (8, 9), 0, 32, "interleaved", per_head=True),
    "norope_p1_7x10_d64": Shape(1, 2, (7, 10), 1, 64, None),
}
PATHS = {  # launcher config overrides
    "in_kernel": dict(prerotate=(False, False), narrow_tail=False),  # the shipped default
    "in_kernel_narrow_tail": dict(prerotate=(False, False), narrow_tail=True),
    "prerotate_narrow_tail": dict(prerotate=(True, True), narrow_tail=True),
}
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]


def _force_path(monkeypatch, path: str, q: torch.Tensor, meta_d: int) -> None:
    cfg = {**T._configs(q, meta_d), **PATHS[path]}
    monkeypatch.setattr(T, "_configs", lambda *_: cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_forward_paths_match_math(shape_name, path, dtype, monkeypatch, nan_empty):
    s = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(21)
    q, k, v = make_qkv("transposed", s.B, s.H, s.N, s.D, dtype, gen)
    do = make_tensor("contiguous", s.B, s.H, s.N, s.D, dtype, gen)
    table = make_table(s, gen)
    why = available(TRITON, q, k, v, table)
    if why:
        pytest.skip(why)
    _force_path(monkeypatch, path, q, T._meta(q, table)["BLOCK_D"])
    ref = run_backend("math", *(t.double() for t in (q, k, v, do)), table)
    got = run_backend(TRITON, q, k, v, do, table)
    for what, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        assert_close_rel(a, b, dtype, f"{path} {what}")
    with torch.no_grad():
        o = T.attention(q, k, v, table, s.D ** -0.5)
    assert_close_rel(o, ref[0], dtype, f"{path} inference o")


@pytest.mark.parametrize("n,block,expected", [(197, 64, 16), (192, 64, 64), (577, 64, 16), (100, 64, 64),
                                              (90, 64, 32), (71, 32, 8 * 2), (200, 128, 128), (1029, 128, 16)])
def test_tail_width(n, block, expected):
    """The last K tile: the remainder rounded up to a power of two, at least 16, at most the block."""
    assert T._tail(n, block) == expected


@pytest.mark.parametrize("n_rows,block,bh", [(197, 64, 3), (192, 64, 1), (1, 128, 7), (1029, 32, 70_400)])
def test_grid_counts_blocks_of_every_pair(n_rows, block, bh):
    assert T._grid(n_rows, block, bh) == -(-n_rows // block) * bh == ((n_rows + block - 1) // block) * bh


def test_grid_beyond_the_launch_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="launch-grid limit"):
        T._grid(2**20, 1, 2**12)
