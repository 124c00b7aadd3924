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
from attnhub.rope import CosSinTable, apply_rope, split_pairs
from tests.helpers import assert_close_rel, device_for

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
        (torch.zeros(4, 6), {}, ValueError, r"emb must be \[N_grid, 2\*D\], \[H, N_grid, 2\*D\], \[B, 1, N_grid"),
        (torch.zeros(2, 1, 3, 4, 8), {}, ValueError, r"emb must be \[N_grid, 2\*D\]"),
        (torch.zeros(2, 1, 0, 8), {}, ValueError, r"no empty dimension"),
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
    device = device_for(backend)
    o = attnhub.attention(q.to(device), k.to(device), v.to(device), table.to(device), backend=backend).cpu()

    q64, k64, v64 = q.double(), k.double(), v.double()
    ref = attnhub.attention(apply_rope(q64, table), apply_rope(k64, table), v64, None, backend="math")
    assert_close_rel(o, ref, torch.float32, f"{backend} {layout} prefix={prefix} per_head={per_head}")
    v_rotated = attnhub.attention(apply_rope(q64, table), apply_rope(k64, table), apply_rope(v64, table),
                                  None, backend="math")
    with pytest.raises(AssertionError):
        assert_close_rel(o, v_rotated, torch.float32)


# --------------------------------------------------------------------------- per-sample tables (timm NaFlex)
def _pair_sum(grad_emb: torch.Tensor, layout: str) -> torch.Tensor:
    """d loss / d emb summed over the two channels of each rotary pair: [..., 2D] -> [..., D]. attnhub reads one
    channel of each pair and timm both, so only the sum is the same: it is what reaches the frequencies or
    angles that an embedding is built from (each feeds both channels of its pair)."""
    sin, cos = grad_emb.chunk(2, -1)
    return torch.cat([sum(split_pairs(sin, layout)), sum(split_pairs(cos, layout))], -1)


NAFLEX_SHAPES = [(3, 4), (2, 5), (4, 4)]  # one grid per sample, padded to the longest (16 tokens)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("prefix", [0, 1])
def test_per_sample_table_equals_timm_naflex_axial(layout, prefix):
    """timm NaFlexViT's `get_batch_embeds(shapes, seq_len)` -> [B, 1, L, 2D] (zero rows at padding)."""
    D, L = 32, 16
    if layout == "half" and not (HAS_ROTATE_HALF and HAS_HALF_APPLY):
        pytest.skip("this timm's RotaryEmbeddingCat has no rotate_half argument (timm < 1.0.30)")
    rope = timm_pe.RotaryEmbeddingCat(dim=D, temperature=100.0, in_pixels=False, grid_indexing="ij",
                                      **({"rotate_half": True} if layout == "half" else {}))
    emb = rope.get_batch_embeds(NAFLEX_SHAPES, seq_len=L).unsqueeze(1).double().requires_grad_()  # [B, 1, L, 2D]
    table = CosSinTable.from_sin_cos(emb, prefix_tokens=prefix, layout=layout)
    assert table.batched and table.batch == 3 and not table.per_head and table.cos.shape == (3, 1, L, D // 2)
    x = _x(3, 2, prefix + L, D, torch.float64).requires_grad_()
    got, ref = apply_rope(x, table), _timm_apply(x, emb, prefix, layout)
    assert_close_rel(got, ref, torch.float64, "per-sample table")
    # gradients reach emb (and x) as through timm's own rotation
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, emb), g)
    ref_grads = torch.autograd.grad(ref, (x, emb), g)
    for what, a, b in zip(("x", "emb"), grads, ref_grads):
        if what == "emb":
            a, b = _pair_sum(a, layout), _pair_sum(b, layout)
        assert_close_rel(a, b, torch.float64, f"grad {what}")


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_per_sample_per_head_table_equals_timm_naflex_mixed(layout):
    """timm's RoPE-Mixed batch embeds [B, depth, H, L, 2D], one depth -> a [B, H, L, 2D] table."""
    D, H, L = 16, 3, 16
    torch.manual_seed(0)
    rope = timm_pe.RotaryEmbeddingMixed(dim=D * H, depth=2, num_heads=H, temperature=10.0)
    emb = rope.get_batch_embeds(NAFLEX_SHAPES, seq_len=L)[:, 1].double()  # [B, H, L, 2D], interleaved
    if layout == "half":  # the same angles in the half layout: [sin_il | cos_il] -> pairs (j, j + D/2)
        sin, cos = emb.chunk(2, -1)
        emb = torch.cat([sin[..., 0::2], sin[..., 0::2], cos[..., 0::2], cos[..., 0::2]], -1)
    emb.requires_grad_()
    table = CosSinTable.from_sin_cos(emb, prefix_tokens=1, layout=layout)
    assert table.batched and table.per_head and (table.batch, table.heads) == (3, H)
    x = _x(3, H, 1 + L, D, torch.float64)
    got, ref = apply_rope(x, table), _timm_apply(x, emb, 1, layout)
    assert_close_rel(got, ref, torch.float64, "per-sample per-head table")
    g = torch.randn_like(got)
    grads = [_pair_sum(torch.autograd.grad(y, emb, g)[0], layout) for y in (got, ref)]
    assert_close_rel(*grads, torch.float64, "grad emb")


def test_per_sample_table_rotates_each_sample_by_its_own_table():
    D, grids = 16, [(2, 3), (3, 2)]
    tables = [CosSinTable(10.0 * (b + 1), grid=g, head_dim=D, prefix_tokens=2) for b, g in enumerate(grids)]
    emb = torch.stack([torch.cat([t.sin.repeat_interleave(2, -1), t.cos.repeat_interleave(2, -1)], -1)
                       for t in tables]).unsqueeze(1)  # [B, 1, 6, 2D]
    batched = CosSinTable.from_sin_cos(emb, prefix_tokens=2)
    x = _x(2, 3, 8, D, torch.float64)
    got = apply_rope(x, batched)
    for b, t in enumerate(tables):
        assert torch.equal(got[b : b + 1], apply_rope(x[b : b + 1], t))


# ------------------------------------------------------------------------------------------ from coordinates
def _grid_coords(gh: int, gw: int, dtype=torch.float32) -> torch.Tensor:
    """[gh*gw, 2] (y, x) in row-major order, as timm NaFlex's patch_coord."""
    y, x = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([y, x], -1).reshape(-1, 2).to(dtype)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("grid", [(3, 5), (14, 14), (1, 7)])
@pytest.mark.parametrize("D", [16, 64, 128])
@pytest.mark.parametrize("base", [100.0, 10000.0])
def test_from_integer_coords_equals_axial_table_exactly(layout, grid, D, base):
    table = CosSinTable(base, grid=grid, head_dim=D, prefix_tokens=1, layout=layout)
    for coords in (_grid_coords(*grid), _grid_coords(*grid).long()):
        got = CosSinTable.from_coords(coords, attnhub.rope.axial_freqs(D, base), prefix_tokens=1, layout=layout)
        assert torch.equal(got.cos, table.cos) and torch.equal(got.sin, table.sin)
        assert (got.seq_len, got.head_dim, got.batched, got.per_head) == (table.seq_len, D, False, False)
    # one per sample: [B, N_grid, 2] -> [B, 1, N_grid, D/2], every sample the axial table
    coords = _grid_coords(*grid).expand(2, -1, -1)
    got = CosSinTable.from_coords(coords, attnhub.rope.axial_freqs(D, base), layout=layout)
    assert got.cos.shape == (2, 1, grid[0] * grid[1], D // 2) and torch.equal(got.cos[1, 0], table.cos)


@pytest.mark.parametrize("grid", [(3, 5), (4, 4)])
def test_axial_freqs_ij_equals_timm_ij_exactly(grid):
    """grid_indexing='ij' (timm NaFlexViT's default): pairs j < D/4 turn with y."""
    D = 32
    emb = _timm_emb(D, grid, 100.0, "interleaved", indexing="ij")
    ref = CosSinTable.from_sin_cos(emb, prefix_tokens=0)
    got = CosSinTable.from_coords(_grid_coords(*grid), attnhub.rope.axial_freqs(D, grid_indexing="ij"))
    assert torch.equal(got.cos, ref.cos) and torch.equal(got.sin, ref.sin)


def _mixed_freqs_yx(timm_freqs: torch.Tensor, depth: int) -> torch.Tensor:
    """timm's RoPE-Mixed parameter (2 = (x, y), depth, H, D/2) -> attnhub's freqs [H, D/2, 2] = (y, x)."""
    return torch.stack([timm_freqs[1, depth], timm_freqs[0, depth]], dim=-1)


def test_from_coords_equals_timm_mixed_exactly():
    """timm's get_mixed_freqs (RoPE-Mixed, learnable per-head frequencies) in float32: bit-equal tables."""
    D, H, grid = 16, 3, (3, 4)
    torch.manual_seed(0)
    rope = timm_pe.RotaryEmbeddingMixed(dim=D * H, depth=2, num_heads=H, temperature=10.0)
    emb = rope.get_embed(list(grid))[1]  # [H, N, 2D]
    ref = CosSinTable.from_sin_cos(emb, prefix_tokens=0)
    t_x, t_y = timm_pe.get_mixed_grid(list(grid), grid_indexing="xy")
    got = CosSinTable.from_coords(torch.stack([t_y, t_x], -1), _mixed_freqs_yx(rope.freqs.detach(), 1))
    assert got.per_head and got.heads == H
    assert torch.equal(got.cos, ref.cos) and torch.equal(got.sin, ref.sin)


def _coords_ref_emb(coords: torch.Tensor, freqs: torch.Tensor, layout: str) -> torch.Tensor:
    """timm's formula in the inputs' dtype: angles y*fy + x*fx, `_rope_layout`, cat(sin, cos).
    [N, 2] x [D/2, 2] -> [N, 2D]; x [H, D/2, 2] -> [H, N, 2D]; [B, N, 2] x ... -> [B, 1 or H, N, 2D]."""
    ang = coords[..., None, :, 0:1] * freqs[..., None, :, 0] + coords[..., None, :, 1:2] * freqs[..., None, :, 1]
    if coords.dim() == 2:
        ang = ang.squeeze(-3) if freqs.dim() == 2 else ang
    half = layout == "half"
    return torch.cat([timm_pe._rope_layout(ang.sin(), half), timm_pe._rope_layout(ang.cos(), half)], -1)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_from_random_coords_equals_timm_float64(layout, batched, per_head):
    """Random float coords (shifted, scaled, gathered) and frequencies, float64, through timm's rotation;
    gradients to q and to freqs and coords."""
    B, H, N, D, P = 2, 3, 7, 16, 1
    g = torch.Generator().manual_seed(5)
    coords = (torch.rand(*((B,) if batched else ()), N, 2, generator=g, dtype=torch.float64) * 20 - 3)
    freqs = torch.randn(*((H,) if per_head else ()), D // 2, 2, generator=g, dtype=torch.float64)
    coords.requires_grad_(), freqs.requires_grad_()
    table = CosSinTable.from_coords(coords, freqs, prefix_tokens=P, layout=layout)
    assert table.dtype == torch.float64 and table.requires_grad
    assert (table.batched, table.per_head, table.n_grid, table.head_dim) == (batched, per_head, N, D)
    emb = _coords_ref_emb(coords, freqs, layout)  # [(B, 1|H,) or (H,)] N, 2D]
    x = _x(B, H, P + N, D, torch.float64).requires_grad_()
    got, ref = apply_rope(x, table), _timm_apply(x, emb, P, layout)
    assert_close_rel(got, ref, torch.float64, "from_coords")
    do = torch.randn_like(got)
    for what, a, b in zip(("x", "coords", "freqs"), torch.autograd.grad(got, (x, coords, freqs), do),
                          torch.autograd.grad(ref, (x, coords, freqs), do)):
        assert_close_rel(a, b, torch.float64, f"grad {what}")


def test_from_coords_keeps_coords_and_caches_only_fixed_tables():
    coords, freqs = _grid_coords(2, 3), attnhub.rope.axial_freqs(16)
    table = CosSinTable.from_coords(coords, freqs, prefix_tokens=1)
    assert torch.equal(table.coords, coords) and torch.equal(table.freqs, freqs) and table.grid is None
    assert table.cos is table.cos, "a table without grad computes cos/sin once"
    learn = CosSinTable.from_coords(coords, freqs.clone().requires_grad_())
    assert learn.cos is not learn.cos and learn.cos.requires_grad, "a learnable table recomputes in autograd"
    assert "from_coords" in repr(table) and "n_grid=6" in repr(table)
    moved = table.to("cpu")
    assert moved.coords is not None and torch.equal(moved.cos, table.cos)


def test_cos_sin_as_keeps_a_conversion_only_for_fixed_tables():
    table = CosSinTable(grid=(3, 4), head_dim=16)
    cos, sin = table.cos_sin_as(torch.float16)
    assert cos.dtype == sin.dtype == torch.float16 and table.cos_sin_as(torch.float16)[0] is cos
    assert torch.equal(cos, table.cos.half()) and torch.equal(sin, table.sin.half())
    assert table.cos_sin_as(torch.float32)[0] is table.cos, "its own dtype: no copy"
    freqs = attnhub.rope.axial_freqs(16).requires_grad_()
    learn = CosSinTable.from_coords(_grid_coords(3, 4), freqs)
    lcos = learn.cos_sin_as(torch.float16)[0]
    assert lcos is not learn.cos_sin_as(torch.float16)[0], "a learnable table converts in autograd every call"
    lcos.float().sum().backward()
    assert freqs.grad is not None


def test_axial_freqs_values():
    f = attnhub.rope.axial_freqs(8, base=100.0)
    assert f.dtype == torch.float32 and f.shape == (4, 2)
    assert torch.equal(f, torch.tensor([[0.0, 1.0], [0.0, 0.1], [1.0, 0.0], [0.1, 0.0]]))
    assert torch.equal(attnhub.rope.axial_freqs(8, grid_indexing="ij"), f[[2, 3, 0, 1]])


# ------------------------------------------------------------------------------------ coordinate augmentation
AUGS = [dict(shift=2.0), dict(jitter=1.5), dict(rescale=2.0), dict(shift=0.5, jitter=1.2, rescale=1.7),
        dict(shift=0.0, jitter=1.0, rescale=1.0), dict()]


@pytest.mark.parametrize("aug", AUGS, ids=lambda a: "-".join(a) or "none")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batched", [False, True])
def test_augment_coords_one_sample_equals_timm(aug, dtype, batched):
    coords = _grid_coords(3, 4, dtype)
    torch.manual_seed(7)
    ref = timm_pe._apply_coord_augs(coords, aug.get("shift"), aug.get("jitter"), aug.get("rescale"))
    x = coords.unsqueeze(0) if batched else coords
    got = attnhub.rope.augment_coords(x, **aug, generator=torch.Generator().manual_seed(7))
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(got.reshape(ref.shape), ref)
    torch.manual_seed(7)  # generator=None: the default generator, as timm
    assert torch.equal(attnhub.rope.augment_coords(x, **aug).reshape(ref.shape), ref)


def test_augment_coords_draws_once_per_sample():
    """[B, N, 2]: sample b is (c + shift[b]) * jitter[b] * rescale[b], drawn [B, 2], [B, 2], [B, 1] in order."""
    B, coords = 4, _grid_coords(3, 3, torch.float64)
    x = torch.stack([coords + b for b in range(B)]).requires_grad_()
    got = attnhub.rope.augment_coords(x, shift=1.0, jitter=1.5, rescale=2.0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    shift = torch.empty(B, 2, dtype=torch.float64).uniform_(-1.0, 1.0, generator=g)
    jitter = torch.empty(B, 2, dtype=torch.float64).uniform_(-math.log(1.5), math.log(1.5), generator=g).exp()
    rescale = torch.empty(B, 1, dtype=torch.float64).uniform_(-math.log(2.0), math.log(2.0), generator=g).exp()
    assert torch.equal(got, (x + shift[:, None]) * jitter[:, None] * rescale[:, None])
    assert len({tuple(s.tolist()) for s in shift}) == B, "samples get their own draws"
    got.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------- errors of the new forms
@pytest.mark.parametrize(
    "coords, freqs, kwargs, exc, pattern",
    [
        ([[0.0, 0.0]], torch.zeros(4, 2), {}, TypeError, r"from_coords: coords must be a tensor, got list"),
        (torch.zeros(3, 2), "f", {}, TypeError, r"from_coords: freqs must be a tensor, got str"),
        (torch.zeros(3, 3), torch.zeros(4, 2), {}, ValueError, r"coords must be \[N_grid, 2\] or \[B, N_grid, 2\]"),
        (torch.zeros(2, 3, 4, 2), torch.zeros(4, 2), {}, ValueError, r"coords must be \[N_grid, 2\]"),
        (torch.zeros(0, 2), torch.zeros(4, 2), {}, ValueError, r"coords must be .* got shape \(0, 2\)"),
        (torch.zeros(3, 2), torch.zeros(4, 3), {}, ValueError, r"freqs must be \[D/2, 2\] or \[H, D/2, 2\]"),
        (torch.zeros(3, 2), torch.zeros(8), {}, ValueError, r"freqs must be \[D/2, 2\]"),
        (torch.zeros(3, 2, dtype=torch.bool), torch.zeros(4, 2), {}, TypeError, r"coords must be a real"),
        (torch.zeros(3, 2), torch.zeros(4, 2, dtype=torch.int64), {}, TypeError, r"freqs must be floating point"),
        (torch.zeros(3, 2), torch.zeros(4, 2, device="meta"), {}, ValueError, r"coords is on cpu but freqs is on meta"),
        (torch.zeros(3, 2), torch.zeros(4, 2), dict(layout="x"), ValueError, r"layout must be one of"),
        (torch.zeros(3, 2), torch.zeros(4, 2), dict(prefix_tokens=-1), ValueError, r"prefix_tokens must be >= 0"),
    ],
)
def test_from_coords_errors(coords, freqs, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CosSinTable.from_coords(coords, freqs, **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, exc, pattern",
    [
        ((30,), {}, ValueError, r"axial_freqs: head_dim must be a multiple of 4"),
        ((16.0,), {}, TypeError, r"axial_freqs: head_dim must be an int"),
        ((16,), dict(base=0.0), ValueError, r"axial_freqs: base must be a finite number > 0"),
        ((16,), dict(grid_indexing="yx"), ValueError, r"grid_indexing must be one of \['xy', 'ij'\], got 'yx'"),
    ],
)
def test_axial_freqs_errors(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnhub.rope.axial_freqs(*args, **kwargs)


@pytest.mark.parametrize(
    "coords, kwargs, exc, pattern",
    [
        ("c", {}, TypeError, r"augment_coords: coords must be a tensor"),
        (torch.zeros(3, 3), {}, ValueError, r"coords must be \[N_grid, 2\] or \[B, N_grid, 2\]"),
        (torch.zeros(3, 2, dtype=torch.int64), {}, TypeError, r"coords must be floating point"),
        (torch.zeros(3, 2), dict(shift=-1.0), ValueError, r"shift must be finite and >= 0"),
        (torch.zeros(3, 2), dict(jitter=0.5), ValueError, r"jitter must be finite and >= 1 .* got 0.5"),
        (torch.zeros(3, 2), dict(rescale=math.inf), ValueError, r"rescale must be finite and >= 1"),
        (torch.zeros(3, 2), dict(rescale=True), TypeError, r"rescale must be a number or None"),
        (torch.zeros(3, 2), dict(shift="1"), TypeError, r"shift must be a number or None"),
        (torch.zeros(3, 2), dict(generator=1), TypeError, r"generator must be a torch.Generator"),
    ],
)
def test_augment_coords_errors(coords, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnhub.rope.augment_coords(coords, **kwargs)
