"""2D rotary position embeddings (RoPE) in timm's convention: axial tables, per-sample tables, coordinates.

The sequence is `P` prefix tokens (CLS, registers; they bypass RoPE) followed by `N_grid` patch tokens. For the
axial grid `CosSinTable(grid=(gh, gw), head_dim=D)` the patches are in row-major order (x fastest) and rotary
pair `j` of a head of size `D` rotates by angle `ang[n, j]`:

- `j < D/4`:  x(n) * band[j]          (the column index first: timm's `grid_indexing='xy'`)
- `j >= D/4`: y(n) * band[j - D/4]
- `band[i] = base ** (-i / (D/4))`

In general (`CosSinTable.from_coords`) pair `j` of token `n` turns by `y(n) * freqs[j, 0] + x(n) * freqs[j, 1]`
for any float coordinates (y, x): shifted, jittered, rescaled (`augment_coords`), or gathered after patch
dropout; `axial_freqs` gives the frequencies of the axial grid above.

Which channels form pair `j` is the layout: `"interleaved"` pairs `(2j, 2j+1)` (timm's
`apply_rot_embed_cat(..., half=False)`, the RoPE-Axial ViTs) and `"half"` pairs `(j, j + D/2)`
(`half=True`, DINOv3 style). Rotation: `(a, b) -> (a cos - b sin, b cos + a sin)`.
"""

from __future__ import annotations

import math

import torch

LAYOUTS = ("interleaved", "half")
GRID_INDEXINGS = ("xy", "ij")


class CosSinTable:
    """Cos and sin of the rotary angles of every patch token, one table per call.

    `cos`, `sin` (`[..., N_grid, D/2]`) come in four shapes: `[N_grid, D/2]` (one table for all heads),
    `[H, N_grid, D/2]` (one per head), `[B, 1, N_grid, D/2]` (one per sample, timm NaFlex) and
    `[B, H, N_grid, D/2]` (per sample and head, NaFlex RoPE-Mixed). Built by:

    - `CosSinTable(base=100.0, grid=(gh, gw), head_dim=64, prefix_tokens=1, layout="interleaved")` (or the
      seed-compatible `CosSinTable(base=100.0, H_img=14, D=64)`: square grid, one CLS token), float32;
    - `CosSinTable.from_sin_cos(emb, ...)` from any timm RoPE embedding, in emb's dtype;
    - `CosSinTable.from_coords(coords, freqs, ...)`: the table keeps `coords` `[(B,) N_grid, 2]` and `freqs`
      `[(H,) D/2, 2]` (so a fused kernel can compute the angles itself) and computes `cos`, `sin` on demand.
    """

    def __init__(
        self,
        base: float = 100.0,
        H_img: int | None = None,
        D: int | None = None,
        device: torch.device | str | None = None,
        *,
        grid: tuple[int, int] | None = None,
        head_dim: int | None = None,
        prefix_tokens: int = 1,
        layout: str = "interleaved",
    ) -> None:
        if H_img is not None:
            if grid is not None:
                raise TypeError("CosSinTable: give either H_img (square grid) or grid=(gh, gw), not both")
            grid = (H_img, H_img)
        if D is not None:
            if head_dim is not None:
                raise TypeError("CosSinTable: give either D or head_dim, not both")
            head_dim = D
        if grid is None or head_dim is None:
            raise TypeError("CosSinTable: needs grid=(gh, gw) (or H_img) and head_dim (or D)")
        gh, gw = _check_grid(grid)
        _check_head_dim(head_dim, "CosSinTable")
        _check_base(base, "CosSinTable")
        ang = axial_angles(float(base), gh, gw, head_dim)
        self._init(prefix_tokens, layout, cos=torch.cos(ang), sin=torch.sin(ang), grid=(gh, gw), device=device)

    @classmethod
    def from_sin_cos(
        cls, emb: torch.Tensor, prefix_tokens: int = 1, layout: str = "interleaved", *, check: bool = True
    ) -> "CosSinTable":
        """A table from timm's concatenated embedding `emb` = cat(sin, cos): `[N_grid, 2*D]`, `[H, N_grid, 2*D]`,
        or per sample as timm's NaFlexViT builds it, `[B, 1, N_grid, 2*D]` or `[B, H, N_grid, 2*D]` (zero rows
        at padding are fine: those tokens rotate to zero, as in timm).

        Any timm RoPE module's `get_embed()` works. With `check`, the two channels of every rotary pair must
        carry the same angle in `emb` (true for every timm RoPE; false when `layout` is the wrong one).
        Gradients flow from the table back into `emb` (learnable frequencies) on backends with `rope_grad`.
        """
        where = "CosSinTable.from_sin_cos"
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"{where}: emb must be a tensor, got {type(emb).__name__}")
        if emb.dim() not in (2, 3, 4) or emb.shape[-1] % 4 or emb.shape[-1] == 0 or 0 in emb.shape:
            raise ValueError(
                f"{where}: emb must be [N_grid, 2*D], [H, N_grid, 2*D], [B, 1, N_grid, 2*D] or "
                f"[B, H, N_grid, 2*D] with D a multiple of 2 and no empty dimension, got shape {tuple(emb.shape)}"
            )
        if not emb.is_floating_point():
            raise TypeError(f"{where}: emb must be floating point, got {emb.dtype}")
        _check_layout(layout)
        sin, cos = emb.chunk(2, dim=-1)
        parts = (*split_pairs(sin, layout), *split_pairs(cos, layout))
        if check and not (torch.equal(parts[0], parts[1]) and torch.equal(parts[2], parts[3])):
            raise ValueError(
                f"{where}: emb is not a {layout!r} RoPE embedding (the two channels of a rotary "
                f"pair differ); try layout={'half' if layout == 'interleaved' else 'interleaved'!r}"
            )
        table = cls.__new__(cls)
        table._init(prefix_tokens, layout, cos=parts[2], sin=parts[0])
        return table

    @classmethod
    def from_coords(
        cls,
        coords: torch.Tensor,
        freqs: torch.Tensor,
        *,
        prefix_tokens: int = 0,
        layout: str = "interleaved",
    ) -> "CosSinTable":
        """A table from patch coordinates and rotary frequencies; pair j of token n turns by
        `coords[..., n, 0] * freqs[..., j, 0] + coords[..., n, 1] * freqs[..., j, 1]`.

        coords: `[N_grid, 2]` or `[B, N_grid, 2]` (y, x) per token, any values (integer dtypes are taken as
        float32). freqs: `[D/2, 2]` (shared by heads) or `[H, D/2, 2]` (per head, RoPE-Mixed), e.g.
        `axial_freqs(D)`. Angles, cos and sin are computed in float32 (float64 if coords or freqs are float64).
        Gradients flow to `freqs` (and `coords`) on backends with `rope_grad`.
        """
        where = "CosSinTable.from_coords"
        for name, t in (("coords", coords), ("freqs", freqs)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
        if coords.dim() not in (2, 3) or coords.shape[-1] != 2 or 0 in coords.shape:
            raise ValueError(
                f"{where}: coords must be [N_grid, 2] or [B, N_grid, 2] (y, x per token), got shape "
                f"{tuple(coords.shape)}"
            )
        if freqs.dim() not in (2, 3) or freqs.shape[-1] != 2 or 0 in freqs.shape:
            raise ValueError(
                f"{where}: freqs must be [D/2, 2] or [H, D/2, 2] (the y and x frequency of each rotary pair), "
                f"got shape {tuple(freqs.shape)}"
            )
        if coords.dtype == torch.bool or coords.is_complex():
            raise TypeError(f"{where}: coords must be a real (float or integer) tensor, got {coords.dtype}")
        if not freqs.is_floating_point():
            raise TypeError(f"{where}: freqs must be floating point, got {freqs.dtype}")
        if coords.device != freqs.device:
            raise ValueError(f"{where}: coords is on {coords.device} but freqs is on {freqs.device}")
        if not coords.is_floating_point():
            coords = coords.to(torch.float32)
        table = cls.__new__(cls)
        table._init(prefix_tokens, layout, coords=coords, freqs=freqs)
        return table

    def _init(self, prefix_tokens, layout, *, cos=None, sin=None, coords=None, freqs=None, grid=None,
              device=None) -> None:
        _check_int(prefix_tokens, "prefix_tokens", minimum=0)
        _check_layout(layout)
        to = lambda t: None if t is None else t.to(device=device).contiguous()  # noqa: E731
        self._cos, self._sin, self.coords, self.freqs = to(cos), to(sin), to(coords), to(freqs)
        self.prefix_tokens = prefix_tokens
        self.layout = layout
        self.grid = grid
        self._wide_cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # see `_wide`
        self._cast_cache: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # see `cos_sin_as`
        if self.coords is not None:  # [(B,) N_grid, 2] x [(H,) D/2, 2] -> cos [(B, 1|H,) or (H,)] N_grid, D/2]
            self.batch = self.coords.shape[0] if self.coords.dim() == 3 else None
            self.heads = self.freqs.shape[0] if self.freqs.dim() == 3 else None
            self._n_grid, self._half = self.coords.shape[-2], self.freqs.shape[-2]
        else:
            self.batch = self._cos.shape[0] if self._cos.dim() == 4 else None
            # [B, 1, N_grid, D/2] is one table per sample shared by the heads (timm NaFlex axial)
            heads = self._cos.shape[-3] if self._cos.dim() >= 3 else None
            self.heads = None if self.batch is not None and heads == 1 else heads
            self._n_grid, self._half = self._cos.shape[-2:]
        # every fact of the table that validation and selection read, for the API's cached fast path
        self.signature = (layout, prefix_tokens, self.batch, self.heads, self._n_grid, self._half,
                          self.coords is not None, self.device)

    # ------------------------------------------------------------------------------------------ cos and sin
    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), computed from coords and freqs for a table built `from_coords` (in autograd when they
        require grad, else once and kept)."""
        if self._cos is not None:
            return self._cos, self._sin
        ct = torch.promote_types(torch.promote_types(self.coords.dtype, self.freqs.dtype), torch.float32)
        c, f = self.coords.to(ct), self.freqs.to(ct)
        y, x = c[..., 0, None], c[..., 1, None]  # [(B,) N_grid, 1]
        if c.dim() == 3:  # a head axis in the output: [B, 1, N_grid, 1]
            y, x = y.unsqueeze(1), x.unsqueeze(1)
        fy, fx = f[..., None, :, 0], f[..., None, :, 1]  # [(H,) 1, D/2]
        ang = y * fy + x * fx  # two products and one add, as timm's get_mixed_freqs (bit-equal axial tables)
        cos, sin = ang.cos(), ang.sin()
        if not self.requires_grad:  # a fixed table: compute once
            self._cos, self._sin = cos, sin
        return cos, sin

    def cos_sin_as(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) in `dtype`, for kernels that read a narrower table than they compute in; kept on the table
        while it needs no gradient (like the rotation's tables, `_wide`)."""
        cos, sin = self.cos_sin()
        if cos.dtype == dtype:
            return cos, sin
        keep = not self.requires_grad and not torch.compiler.is_compiling()
        if keep and dtype in self._cast_cache:
            return self._cast_cache[dtype]
        cast = cos.to(dtype), sin.to(dtype)
        if keep:
            self._cast_cache[dtype] = cast
        return cast

    @property
    def cos(self) -> torch.Tensor:
        return self.cos_sin()[0]

    @property
    def sin(self) -> torch.Tensor:
        return self.cos_sin()[1]

    # ---------------------------------------------------------------------------------------------- facts
    @property
    def head_dim(self) -> int:
        return 2 * self._half

    @property
    def n_grid(self) -> int:
        return self._n_grid

    @property
    def seq_len(self) -> int:
        """The N that q and k must have: prefix tokens + patch tokens."""
        return self.prefix_tokens + self.n_grid

    @property
    def per_head(self) -> bool:
        """One set of angles per head (`heads` of them)."""
        return self.heads is not None

    @property
    def batched(self) -> bool:
        """One table per sample (`batch` of them)."""
        return self.batch is not None

    @property
    def device(self) -> torch.device:
        return (self.coords if self.coords is not None else self._cos).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of cos and sin."""
        if self.coords is None:
            return self._cos.dtype
        return torch.promote_types(torch.promote_types(self.coords.dtype, self.freqs.dtype), torch.float32)

    @property
    def requires_grad(self) -> bool:
        if self.coords is not None:
            return self.coords.requires_grad or self.freqs.requires_grad
        return self._cos.requires_grad or self._sin.requires_grad

    def to(self, device: torch.device | str) -> "CosSinTable":
        table = CosSinTable.__new__(CosSinTable)
        if self.coords is not None:
            table._init(self.prefix_tokens, self.layout, coords=self.coords, freqs=self.freqs, device=device)
        else:
            table._init(self.prefix_tokens, self.layout, cos=self._cos, sin=self._sin, grid=self.grid,
                        device=device)
        return table

    def __repr__(self) -> str:
        grid = f"grid={self.grid}, " if self.grid else f"n_grid={self.n_grid}, "
        batch = f"batch={self.batch}, " if self.batched else ""
        heads = f"heads={self.heads}, " if self.per_head else ""
        form = "from_coords, " if self.coords is not None else ""
        return (
            f"CosSinTable({form}{grid}{batch}{heads}head_dim={self.head_dim}, prefix_tokens={self.prefix_tokens}, "
            f"layout={self.layout!r}, dtype={self.dtype}, device={self.device})"
        )


def _bands(base: float, n_bands: int) -> torch.Tensor:
    """`base ** (-i / n_bands)`, float32, computed exactly as timm's `freq_bands(..., step=1)` (bit-equal)."""
    exponent = torch.arange(n_bands, dtype=torch.int64).to(torch.float32) / n_bands
    return 1.0 / (base**exponent)


def axial_angles(base: float, gh: int, gw: int, head_dim: int) -> torch.Tensor:
    """Rotary angles `[gh*gw, head_dim/2]`, computed in float32 exactly as timm does (bit-equal tables)."""
    bands = _bands(base, head_dim // 4)
    y, x = torch.meshgrid(
        torch.arange(gh, dtype=torch.int64).to(torch.float32),
        torch.arange(gw, dtype=torch.int64).to(torch.float32),
        indexing="ij",
    )
    pos = torch.stack([x, y], dim=-1).unsqueeze(-1) * bands  # [gh, gw, 2 axes, n_bands]
    return pos.flatten(-2).flatten(0, 1)


def axial_freqs(head_dim: int, base: float = 100.0, grid_indexing: str = "xy") -> torch.Tensor:
    """The frequencies `[head_dim/2, 2]` (y, x) of timm's axial RoPE (`RotaryEmbeddingCat(in_pixels=False)`),
    float32, for `CosSinTable.from_coords`.

    `grid_indexing="xy"` (attnhub's `CosSinTable(grid=...)`, timm's RoPE ViTs): pairs `j < D/4` turn with x,
    the others with y; `"ij"` (timm NaFlexViT's default): pairs `j < D/4` turn with y, the others with x.
    `from_coords(integer grid coords, axial_freqs(D, base))` equals `CosSinTable(base, grid=..., head_dim=D)`.
    """
    _check_head_dim(head_dim, "axial_freqs")
    _check_base(base, "axial_freqs")
    if grid_indexing not in GRID_INDEXINGS:
        raise ValueError(f"axial_freqs: grid_indexing must be one of {list(GRID_INDEXINGS)}, got {grid_indexing!r}")
    bands, zeros = _bands(float(base), head_dim // 4), torch.zeros(head_dim // 4)
    first, second = (torch.stack([zeros, bands], -1), torch.stack([bands, zeros], -1))  # x-only, y-only pairs
    if grid_indexing == "ij":
        first, second = second, first
    return torch.cat([first, second], dim=0)


def augment_coords(
    coords: torch.Tensor,
    *,
    shift: float | None = None,
    jitter: float | None = None,
    rescale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """timm's training-time RoPE coordinate augmentation (`_apply_coord_augs`), one draw per sample.

    coords: `[N_grid, 2]` (one draw) or `[B, N_grid, 2]` (one per sample), floating point. In order, as timm:
    `coords + shift_b` with `shift_b ~ U(-shift, shift)` per axis ([B, 2]); `coords * jitter_b` with
    `jitter_b = exp(U(-log jitter, log jitter))` per axis ([B, 2]); `coords * rescale_b` with
    `rescale_b = exp(U(-log rescale, log rescale))` shared by the axes ([B, 1]). Draws are in coords' dtype
    and device from `generator` (the default generator when None); with B = 1 they equal timm's draw on the
    same random stream, axis for axis (timm's channel order: (y, x) for `grid_indexing='ij'`).
    Returns a new tensor of coords' shape; gradients flow to coords.
    """
    where = "augment_coords"
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"{where}: coords must be a tensor, got {type(coords).__name__}")
    if coords.dim() not in (2, 3) or coords.shape[-1] != 2:
        raise ValueError(f"{where}: coords must be [N_grid, 2] or [B, N_grid, 2], got shape {tuple(coords.shape)}")
    if not coords.is_floating_point():
        raise TypeError(f"{where}: coords must be floating point (e.g. coords.float()), got {coords.dtype}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    for name, value, minimum in (("shift", shift, 0.0), ("jitter", jitter, 1.0), ("rescale", rescale, 1.0)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: {name} must be a number or None, got {type(value).__name__} {value!r}")
        if not math.isfinite(value) or value < minimum:
            what = "a shift in coordinate units" if name == "shift" else "a multiplicative factor"
            raise ValueError(f"{where}: {name} must be finite and >= {minimum:g} ({what}), got {value!r}")
    batched = coords.dim() == 3
    x = coords if batched else coords.unsqueeze(0)  # [B, N_grid, 2]

    def draw(n: int, bound: float) -> torch.Tensor:  # [B, 1, n] ~ U(-bound, bound)
        u = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype).uniform_(-bound, bound, generator=generator)
        return u.unsqueeze(1)

    if shift is not None:
        x = x + draw(2, float(shift))
    if jitter is not None:
        x = x * draw(2, math.log(jitter)).exp()
    if rescale is not None:
        x = x * draw(1, math.log(rescale)).exp()
    return x if batched else x.squeeze(0)


def apply_rope(x: torch.Tensor, table: CosSinTable) -> torch.Tensor:
    """Rotate the patch tokens of `x: [B, H, N, D]` in PyTorch; prefix tokens pass unchanged.

    The rotation is computed in the table's precision (float32, or float64 for float64 `x`) and cast back to
    x's dtype once, as timm's `apply_rot_embed_cat` does. A per-sample table needs B to match, a per-head
    table H.
    """
    return _rotate(x, table, *_wide(table, x.dtype))


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, table: CosSinTable) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rope` to q and k with one evaluation of the table (a `from_coords` table computes its angles once)."""
    wide = _wide(table, q.dtype)
    return _rotate(q, table, *wide), _rotate(k, table, *wide)


def _wide(table: CosSinTable, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin per channel, [..., D] in the compute dtype, so that x * cos + swap(x) * sin rotates x
    (swap: each channel's pair partner); kept on the table while it needs no gradient."""
    cos, sin = table.cos_sin()
    ct = torch.promote_types(dtype, cos.dtype)
    keep = not table.requires_grad and not torch.compiler.is_compiling()  # a graph computes it in place, fused
    cache = table._wide_cache
    if keep and ct in cache:
        return cache[ct]
    cos, sin = cos.to(ct), sin.to(ct)
    if table.layout == "interleaved":
        wide = cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)
    else:
        wide = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)
    if keep:
        cache[ct] = wide
    return wide


def _rotate(x: torch.Tensor, table: CosSinTable, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # cos, sin: [N_grid, D], [H, N_grid, D], [B, 1|H, N_grid, D]: each broadcasts against [B, H, N_grid, D].
    # Four kernels over x (swap, product, fused multiply-add, cast; one more copy with prefix tokens), where the
    # pairwise form took ten: this backend is the portable path, so it must not be slower than timm's own.
    p = table.prefix_tokens
    xs = x[:, :, p:]
    if table.layout == "interleaved":
        swapped = xs.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        swapped = xs.roll(xs.shape[-1] // 2, -1)
    rotated = torch.addcmul(xs * cos, swapped, sin)
    if p == 0:
        return rotated.to(x.dtype)
    out = torch.empty_like(x)
    out[:, :, :p] = x[:, :, :p]
    out[:, :, p:] = rotated
    return out


def table_strides(cos: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a table [N_grid, D/2], [H, N_grid, D/2] or [B, 1|H, N_grid, D/2]; 0 where it
    is shared (for kernels that index any of the four shapes alike)."""
    if cos.dim() == 4:
        return cos.stride(0), cos.stride(1) if cos.shape[1] > 1 else 0, cos.stride(2)
    return 0, cos.stride(0) if cos.dim() == 3 else 0, cos.stride(-2)


def table_grad(cos: torch.Tensor, sin: torch.Tensor, prefix_tokens: int, layout: str, q: torch.Tensor,
               k: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the loss w.r.t. a table's cos and sin ([N_grid, D/2], [H, N_grid, D/2] or [B, 1|H, N_grid,
    D/2]) from the unrotated q: [B, H, N, D], k: [B, H_kv, N, D] and the gradients dq, dk w.r.t. them (for backends
    that rotate outside autograd).

    A pair (a, b) rotates to (a c - b s, b c + a s); its gradient g w.r.t. the rotated pair is R dx = (dxa c - dxb s,
    dxb c + dxa s), so dL/dc = sum(g . (a, b)) = c U + s W and dL/ds = sum(g . (-b, a)) = s U - c W with
    U = sum(dxa a + dxb b), W = sum(dxa b - dxb a) over what the table is shared by (batch, heads), for q and k.
    fp32 (fp64 tables stay fp64); prefix tokens do not rotate and contribute nothing.
    """
    ct = torch.promote_types(cos.dtype, torch.float32)
    U = W = 0
    for x, dx in ((q, dq), (k, dk)):  # pairs of the patch tokens: [B, H or H_kv, N_grid, D/2] each
        (a, b), (ga, gb) = (split_pairs(t[:, :, prefix_tokens:].to(ct), layout) for t in (x, dx))
        U = U + (ga * a + gb * b).sum_to_size(cos.shape)
        W = W + (ga * b - gb * a).sum_to_size(cos.shape)
    c, s = cos.detach().to(ct), sin.detach().to(ct)
    return (c * U + s * W).to(cos.dtype), (s * U - c * W).to(sin.dtype)


def split_pairs(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] -> the rotary pairs' first and second channels a, b: [..., D/2] (views): channels (2j, 2j+1)
    for the interleaved layout, (j, j + D/2) for the half layout."""
    if layout == "interleaved":
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def _check_grid(grid) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"CosSinTable: grid must be (gh, gw), got {grid!r}")
    for name, v in zip(("gh", "gw"), grid):
        _check_int(v, f"grid {name}", minimum=1)
    return int(grid[0]), int(grid[1])


def _check_head_dim(head_dim, where: str) -> None:
    _check_int(head_dim, "head_dim", minimum=4, where=where)
    if head_dim % 4:
        raise ValueError(
            f"{where}: head_dim must be a multiple of 4 for 2D axial RoPE (two axes of rotary pairs), got {head_dim}"
        )


def _check_base(base, where: str) -> None:
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
        raise ValueError(f"{where}: base must be a finite number > 0, got {base!r}")


def _check_int(value, name: str, *, minimum: int, where: str = "CosSinTable") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value}")


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"CosSinTable: layout must be one of {list(LAYOUTS)}, got {layout!r}")
