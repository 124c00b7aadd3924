"""attnhub/rope.py: `CosSinTable` and `apply_rope` against timm's own RoPE functions (the convention attnhub must
equal), the table constructors and their errors, and RoPE through every backend (applied to q and k, not v).

timm reference: `RotaryEmbeddingCat(dim=D, temperature=base, in_pixels=False, feat_shape=(gh, gw),
grid_indexing='xy').get_embed()` -> emb [gh*gw, 2*D] = cat(sin, cos); `apply_rot_embed_cat(x, emb, half=...)`.
The half layout needs `RotaryEmbeddingCat(rotate_half=True)` (timm >= 1.0.30); older timm skips those cases.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import attnhub
from attnhub.rope import CosSinTable, apply_rope
from tests.helpers import assert_close_rel

timm_pe = pytest.importorskip("timm.layers.pos_embed_sincos")

BACKENDS = ["math", "torch_sdpa", "triton_fa_rope"]
HAS_ROTATE_HALF = "rotate_half" in inspect.signature(timm_pe.RotaryEmbeddingCat).parameters
HAS_HALF_APPLY = "half" in inspect.signature(timm_pe.apply_rot_embed_cat).parameters


def _timm_emb(D: int, grid: tuple[int, int], base: float, layout: str, indexing: str = "xy") -> torch.Tensor:
    """timm's emb [gh*gw, 2*D] = cat(sin, cos) for this layout; skips the half layout on timm without it."""
    kw = {}
    if layout == "half":
        if not (HAS_ROTATE_HALF and HAS_HALF_APPLY):
            pytest.skip("this timm's RotaryEmbeddingCat has no rotate_half argument (timm < 1.0.30)")
        kw["rotate_half"] = True
    rope = timm_pe.RotaryEmbeddingCat(
        dim=D, temperature=base, in_pixels=False, feat_shape=list(grid), grid_indexing=indexing, **kw
    )
    return rope.get_embed()


def _timm_apply(x: torch.Tensor, emb: torch.Tensor, prefix: int, layout: str) -> torch.Tensor:
    """x: [B, H, N, D] with `prefix` leading tokens left alone, as timm's ViTs (Eva) do."""
    kw = {"half": True} if layout == "half" else {}
    return torch.cat([x[:, :, :prefix], timm_pe.apply_rot_embed_cat(x[:, :, prefix:], emb, **kw)], dim=2)


def _x(B, H, N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------- against timm
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("grid", [(3, 5), (4, 7), (2, 2)])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("base", [100.0, 10000.0])
def test_apply_rope_equals_timm(layout, grid, prefix, D, base):
    emb = _timm_emb(D, grid, base, layout)
    table = CosSinTable(base, grid=grid, head_dim=D, prefix_tokens=prefix, layout=layout)
    assert table.seq_len == prefix + grid[0] * grid[1] and table.head_dim == D
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = _x(2, 3, table.seq_len, D, dtype)
        got = apply_rope(x, table)
        assert got.dtype == dtype
        assert_close_rel(got, _timm_apply(x, emb, prefix, layout), dtype, f"apply_rope {dtype}")
        assert torch.equal(got[:, :, :prefix], x[:, :, :prefix]), "prefix tokens must pass unchanged"
    # from_sin_cos(timm's emb) is the same table
    back = CosSinTable.from_sin_cos(emb, prefix_tokens=prefix, layout=layout)
    assert torch.equal(back.cos, table.cos) and torch.equal(back.sin, table.sin)
    assert (back.prefix_tokens, back.layout, back.seq_len) == (prefix, layout, table.seq_len)


def test_xy_swapped_table_is_not_timm():
    """The seed's bug (x and y axes swapped, timm's grid_indexing='ij') must fail the comparison above."""
    D, grid, base = 64, (14, 14), 100.0
    emb = _timm_emb(D, grid, base, "interleaved")
    swapped = CosSinTable.from_sin_cos(_timm_emb(D, grid, base, "interleaved", indexing="ij"), prefix_tokens=1)
    x = _x(1, 2, swapped.seq_len, D)
    with pytest.raises(AssertionError, match="relative L2 error"):
        assert_close_rel(apply_rope(x, swapped), _timm_apply(x, emb, 1, "interleaved"), torch.float32)
    assert not torch.equal(swapped.cos, CosSinTable(base, H_img=14, D=D).cos)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_per_head_tables_equal_timm_per_head(layout):
    """cos: [H, N_grid, D/2] from timm embeddings stacked per head (a different base per head)."""
    D, grid, H, P = 32, (3, 4), 3, 1
    embs = torch.stack([_timm_emb(D, grid, base, layout) for base in (10.0, 100.0, 10000.0)])  # [H, N, 2D]
    table = CosSinTable.from_sin_cos(embs, prefix_tokens=P, layout=layout)
    assert table.per_head and table.cos.shape == (H, 12, D // 2)
    x = _x(2, H, table.seq_len, D)
    ref = torch.stack([_timm_apply(x[:, h : h + 1], embs[h], P, layout)[:, 0] for h in range(H)], dim=1)
    assert_close_rel(apply_rope(x, table), ref, torch.float32)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_from_sin_cos_wrong_layout_is_rejected(layout):
    other = "half" if layout == "interleaved" else "interleaved"
    emb = _timm_emb(32, (3, 5), 100.0, layout)
    with pytest.raises(ValueError, match=rf"emb is not a '{other}' RoPE embedding.*try layout='{layout}'"):
        CosSinTable.from_sin_cos(emb, layout=other)
    CosSinTable.from_sin_cos(emb, layout=other, check=False)  # the caller's responsibility then


def test_seed_form_equals_general_form():
    seed = CosSinTable(base=100.0, H_img=14, D=64)
    general = CosSinTable(100.0, grid=(14, 14), head_dim=64, prefix_tokens=1, layout="interleaved")
    assert torch.equal(seed.cos, general.cos) and torch.equal(seed.sin, general.sin)
    assert (seed.prefix_tokens, seed.layout, seed.grid, seed.seq_len) == (1, "interleaved", (14, 14), 197)
    assert seed.cos.dtype == torch.float32 and seed.cos.shape == (196, 32) and seed.cos.is_contiguous()
    assert "grid=(14, 14)" in repr(seed)


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(grid=(3, 3), head_dim=30), ValueError, r"head_dim must be a multiple of 4 .* got 30"),
        (dict(grid=(3, 3), head_dim=2), ValueError, r"head_dim must be >= 4, got 2"),
        (dict(grid=(3, 3), head_dim=32.0), TypeError, r"head_dim must be an int"),
        (dict(grid=(0, 3), head_dim=32), ValueError, r"grid gh must be >= 1, got 0"),
        (dict(grid=(3, -2), head_dim=32), ValueError, r"grid gw must be >= 1, got -2"),
        (dict(grid=(3,), head_dim=32), ValueError, r"grid must be \(gh, gw\)"),
        (dict(grid=(3, 2.5), head_dim=32), TypeError, r"grid gw must be an int"),
        (dict(H_img=0, D=32), ValueError, r"grid gh must be >= 1"),
        (dict(base=0.0, grid=(3, 3), head_dim=32), ValueError, r"base must be a finite number > 0, got 0.0"),
        (dict(base=-10.0, grid=(3, 3), head_dim=32), ValueError, r"base must be a finite number > 0"),
        (dict(base=math.inf, grid=(3, 3), head_dim=32), ValueError, r"base must be a finite number > 0, got inf"),
        (dict(base=math.nan, grid=(3, 3), head_dim=32), ValueError, r"base must be a finite number > 0, got nan"),
        (dict(base=True, grid=(3, 3), head_dim=32), ValueError, r"base must be a finite number"),
        (dict(grid=(3, 3), head_dim=32, layout="rotate"), ValueError, r"layout must be one of .* got 'rotate'"),
        (dict(grid=(3, 3), head_dim=32, prefix_tokens=-1), ValueError, r"prefix_tokens must be >= 0, got -1"),
        (dict(grid=(3, 3), head_dim=32, prefix_tokens=1.0), TypeError, r"prefix_tokens must be an int"),
        (dict(H_img=3, grid=(3, 3), D=32), TypeError, r"either H_img .* or grid"),
        (dict(grid=(3, 3), D=32, head_dim=32), TypeError, r"either D or head_dim"),
        (dict(grid=(3, 3)), TypeError, r"needs grid=\(gh, gw\) \(or H_img\) and head_dim"),
    ],
)
def test_table_errors_name_the_argument(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CosSinTable(**kwargs)


@pytest.mark.parametrize(
    "emb, kwargs, exc, pattern",
    [
        ([[0.0] * 8], {}, TypeError, r"emb must be a tensor, got list"),
        (torch.zeros(4, 6), {}, ValueError, r"emb must be \[N_grid, 2\*D\] or \[H, N_grid, 2\*D\]"),
        (torch.zeros(8), {}, ValueError, r"emb must be \[N_grid, 2\*D\]"),
        (torch.zeros(4, 8, dtype=torch.int32), {}, TypeError, r"emb must be floating point"),
        (torch.zeros(4, 8), dict(layout="x"), ValueError, r"layout must be one of"),
        (torch.zeros(4, 8), dict(prefix_tokens=-3), ValueError, r"prefix_tokens must be >= 0"),
    ],
)
def test_from_sin_cos_errors(emb, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CosSinTable.from_sin_cos(emb, **kwargs)


# ------------------------------------------------------------------------------------- through the backends
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("prefix, per_head", [(0, False), (1, False), (5, True)])
def test_backend_rope_is_rotation_of_q_and_k_only(backend, layout, prefix, per_head):
    """attention(q, k, v, rope) == math(apply_rope(q), apply_rope(k), v) in float64, and != with v rotated too."""
    B, H, D, grid = 1, 2, 16, (2, 3)
    table = CosSinTable(100.0, grid=grid, head_dim=D, prefix_tokens=prefix, layout=layout)
    if per_head:  # a different table per head: angles scaled by (h + 1)
        ang = torch.atan2(table.sin, table.cos)
        ang = torch.stack([ang * (h + 1) for h in range(H)])
        widen = (lambda t: t.repeat_interleave(2, -1)) if layout == "interleaved" else (lambda t: torch.cat([t, t], -1))
        table = CosSinTable.from_sin_cos(torch.cat([widen(ang.sin()), widen(ang.cos())], -1), prefix, layout)
    q, k, v = (_x(B, H, table.seq_len, D, seed=s) for s in range(3))
    o = attnhub.attention(q, k, v, table, backend=backend)

    q64, k64, v64 = q.double(), k.double(), v.double()
    ref = attnhub.attention(apply_rope(q64, table), apply_rope(k64, table), v64, None, backend="math")
    assert_close_rel(o, ref, torch.float32, f"{backend} {layout} prefix={prefix} per_head={per_head}")
    v_rotated = attnhub.attention(apply_rope(q64, table), apply_rope(k64, table), apply_rope(v64, table),
                                  None, backend="math")
    with pytest.raises(AssertionError):
        assert_close_rel(o, v_rotated, torch.float32)
