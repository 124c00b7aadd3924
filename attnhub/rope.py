"""2D axial rotary position embeddings (RoPE) in timm's convention.

The sequence is `P` prefix tokens (CLS, registers; they bypass RoPE) followed by `gh * gw` patch tokens in
row-major order (x fastest). Rotary pair `j` of a head of size `D` rotates by angle `ang[n, j]`:

- `j < D/4`:  x(n) * band[j]          (the column index first: timm's `grid_indexing='xy'`)
- `j >= D/4`: y(n) * band[j - D/4]
- `band[i] = base ** (-i / (D/4))`

Which channels form pair `j` is the layout: `"interleaved"` pairs `(2j, 2j+1)` (timm's
`apply_rot_embed_cat(..., half=False)`, the RoPE-Axial ViTs) and `"half"` pairs `(j, j + D/2)`
(`half=True`, DINOv3 style). Rotation: `(a, b) -> (a cos - b sin, b cos + a sin)`.
"""

from __future__ import annotations

import math

import torch

LAYOUTS = ("interleaved", "half")


class CosSinTable:
    """Cos and sin of the rotary angles of every patch token.

    `cos`, `sin`: `[N_grid, D/2]` (one table for all heads) or `[H, N_grid, D/2]` (one per head), contiguous,
    float32 unless built `from_sin_cos` with another dtype. Built either in the seed-compatible form
    `CosSinTable(base=100.0, H_img=14, D=64)` (square grid, one CLS token) or the general form
    `CosSinTable(base=100.0, grid=(gh, gw), head_dim=64, prefix_tokens=1, layout="interleaved")`.
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
        _check_int(head_dim, "head_dim", minimum=4)
        if head_dim % 4:
            raise ValueError(
                f"CosSinTable: head_dim must be a multiple of 4 for 2D axial RoPE (two axes of rotary pairs), "
                f"got {head_dim}"
            )
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
            raise ValueError(f"CosSinTable: base must be a finite number > 0, got {base!r}")
        ang = axial_angles(float(base), gh, gw, head_dim)
        self._init(torch.cos(ang), torch.sin(ang), prefix_tokens, layout, grid=(gh, gw), device=device)

    @classmethod
    def from_sin_cos(
        cls, emb: torch.Tensor, prefix_tokens: int = 1, layout: str = "interleaved", *, check: bool = True
    ) -> "CosSinTable":
        """A table from timm's concatenated embedding `emb: [N_grid, 2*D]` (or `[H, N_grid, 2*D]`) = cat(sin, cos).

        Any timm RoPE module's `get_embed()` works. With `check`, the two channels of every rotary pair must
        carry the same angle in `emb` (true for every timm RoPE; false when `layout` is the wrong one).
        Gradients flow from the table back into `emb` (learnable frequencies) on backends with `rope_grad`.
        """
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"CosSinTable.from_sin_cos: emb must be a tensor, got {type(emb).__name__}")
        if emb.dim() not in (2, 3) or emb.shape[-1] % 4 or emb.shape[-1] == 0:
            raise ValueError(
                "CosSinTable.from_sin_cos: emb must be [N_grid, 2*D] or [H, N_grid, 2*D] with D a multiple of 2, "
                f"got shape {tuple(emb.shape)}"
            )
        if not emb.is_floating_point():
            raise TypeError(f"CosSinTable.from_sin_cos: emb must be floating point, got {emb.dtype}")
        _check_layout(layout)
        sin, cos = emb.chunk(2, dim=-1)
        parts = (*split_pairs(sin, layout), *split_pairs(cos, layout))
        if check and not (torch.equal(parts[0], parts[1]) and torch.equal(parts[2], parts[3])):
            raise ValueError(
                f"CosSinTable.from_sin_cos: emb is not a {layout!r} RoPE embedding (the two channels of a rotary "
                f"pair differ); try layout={'half' if layout == 'interleaved' else 'interleaved'!r}"
            )
        table = cls.__new__(cls)
        table._init(parts[2], parts[0], prefix_tokens, layout, grid=None, device=None)
        return table

    def _init(self, cos, sin, prefix_tokens, layout, *, grid, device) -> None:
        _check_int(prefix_tokens, "prefix_tokens", minimum=0)
        _check_layout(layout)
        self.cos = cos.to(device=device).contiguous()
        self.sin = sin.to(device=device).contiguous()
        self.prefix_tokens = prefix_tokens
        self.layout = layout
        self.grid = grid

    @property
    def head_dim(self) -> int:
        return 2 * self.cos.shape[-1]

    @property
    def n_grid(self) -> int:
        return self.cos.shape[-2]

    @property
    def seq_len(self) -> int:
        """The N that q and k must have: prefix tokens + patch tokens."""
        return self.prefix_tokens + self.n_grid

    @property
    def per_head(self) -> bool:
        return self.cos.dim() == 3

    @property
    def device(self) -> torch.device:
        return self.cos.device

    @property
    def requires_grad(self) -> bool:
        return self.cos.requires_grad or self.sin.requires_grad

    def to(self, device: torch.device | str) -> "CosSinTable":
        table = CosSinTable.__new__(CosSinTable)
        table._init(self.cos, self.sin, self.prefix_tokens, self.layout, grid=self.grid, device=device)
        return table

    def __repr__(self) -> str:
        grid = f"grid={self.grid}, " if self.grid else f"n_grid={self.n_grid}, "
        heads = f"heads={self.cos.shape[0]}, " if self.per_head else ""
        return (
            f"CosSinTable({grid}{heads}head_dim={self.head_dim}, prefix_tokens={self.prefix_tokens}, "
            f"layout={self.layout!r}, dtype={self.cos.dtype}, device={self.device})"
        )


def axial_angles(base: float, gh: int, gw: int, head_dim: int) -> torch.Tensor:
    """Rotary angles `[gh*gw, head_dim/2]`, computed in float32 exactly as timm does (bit-equal tables)."""
    n_bands = head_dim // 4
    exponent = torch.arange(n_bands, dtype=torch.int64).to(torch.float32) / n_bands
    bands = 1.0 / (base**exponent)
    y, x = torch.meshgrid(
        torch.arange(gh, dtype=torch.int64).to(torch.float32),
        torch.arange(gw, dtype=torch.int64).to(torch.float32),
        indexing="ij",
    )
    pos = torch.stack([x, y], dim=-1).unsqueeze(-1) * bands  # [gh, gw, 2 axes, n_bands]
    return pos.flatten(-2).flatten(0, 1)


def apply_rope(x: torch.Tensor, table: CosSinTable) -> torch.Tensor:
    """Rotate the patch tokens of `x: [B, H, N, D]` in PyTorch; prefix tokens pass unchanged.

    The rotation is computed in the table's precision (float32, or float64 for float64 `x`) and cast back to
    x's dtype once, as timm's `apply_rot_embed_cat` does.
    """
    p = table.prefix_tokens
    ct = torch.promote_types(x.dtype, table.cos.dtype)
    cos, sin = table.cos.to(ct), table.sin.to(ct)
    if table.per_head:  # [H, N_grid, D/2] -> broadcast over B
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    a, b = split_pairs(x[:, :, p:].to(ct), table.layout)
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if table.layout == "interleaved":
        rotated = torch.stack([ra, rb], dim=-1).flatten(-2)
    else:
        rotated = torch.cat([ra, rb], dim=-1)
    return torch.cat([x[:, :, :p], rotated.to(x.dtype)], dim=2)


def table_grad(cos: torch.Tensor, sin: torch.Tensor, prefix_tokens: int, layout: str, q: torch.Tensor,
               k: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the loss w.r.t. a table's cos and sin ([N_grid, D/2] or [H, N_grid, D/2]) from the unrotated
    q, k: [B, H, N, D] and the gradients dq, dk w.r.t. them (for backends that rotate outside autograd).

    A pair (a, b) rotates to (a c - b s, b c + a s); its gradient g w.r.t. the rotated pair is R dx = (dxa c - dxb s,
    dxb c + dxa s), so dL/dc = sum(g . (a, b)) = c U + s W and dL/ds = sum(g . (-b, a)) = s U - c W with
    U = sum(dxa a + dxb b), W = sum(dxa b - dxb a) over the batch (and the heads for a shared table), for q and k.
    fp32 (fp64 tables stay fp64); prefix tokens do not rotate and contribute nothing.
    """
    ct = torch.promote_types(cos.dtype, torch.float32)
    U = W = 0
    for x, dx in ((q, dq), (k, dk)):  # pairs of the patch tokens: [B, H, N_grid, D/2] each
        (a, b), (ga, gb) = (split_pairs(t[:, :, prefix_tokens:].to(ct), layout) for t in (x, dx))
        U = U + (ga * a + gb * b).sum(0)
        W = W + (ga * b - gb * a).sum(0)
    if cos.dim() == 2:  # one table shared by the heads
        U, W = U.sum(0), W.sum(0)
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


def _check_int(value, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"CosSinTable: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"CosSinTable: {name} must be >= {minimum}, got {value}")


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"CosSinTable: layout must be one of {list(LAYOUTS)}, got {layout!r}")
