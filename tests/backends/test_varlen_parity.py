"""Variable-resolution batches (issue 12), float64 parity: key padding, grouped k/v heads, per-sample tables,
tables from coordinates, coordinate augmentation; forward output and gradients to q, k, v and to the table's
leaf (timm's embedding, the frequencies, the coordinates).

Every backend that can run the call (`attnhub.explain`, forced: all four built-ins; on CPU the Triton backends run
in the interpreter) is compared with `reference`, an explicit loop over samples and query heads that selects the
valid keys and the k/v head of each query head, in float64. Backends run in float64 (relative L2 <= 1e-12) and in
float32 (<= 1e-5), in those of the two their registry entry accepts (the Triton backends: float32 only). On CPU
triton_fa_rope takes its split backward (the interpreter's configs), the path that reads the mask and k/v groups;
these shapes fit one tile, tests/backends/triton_fa_rope/test_backward.py has several.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

import attnhub
from attnhub.registry import REGISTRY
from attnhub.rope import CosSinTable, apply_rope, augment_coords, axial_freqs
from attnhub.tolerances import bound
from tests.helpers import DEVICE, assert_close_rel, available

BACKENDS = sorted(REGISTRY.specs())
ANGLES_IN_KERNEL = {"triton_rope_sdpa"}  # computes a from_coords table's cos and sin in its kernel


# --------------------------------------------------------------------------------------------------- helpers
def reference(q, k, v, table, mask) -> torch.Tensor:
    """o: [B, H, N, D] one (sample, query head) at a time: RoPE (`apply_rope`, tested against timm in
    tests/test_rope.py), then softmax over the valid keys of k/v head h // (H / H_kv); zeros without one."""
    if table is not None:
        q, k = apply_rope(q, table), apply_rope(k, table)
    B, H, N, D = q.shape
    group = H // k.shape[1]
    rows = []
    for b in range(B):
        keep = torch.ones(k.shape[2], dtype=torch.bool) if mask is None else mask[b].cpu()
        heads = []
        for h in range(H):
            kh, vh = k[b, h // group, keep], v[b, h // group, keep]
            if kh.shape[0] == 0:  # zeros, with q, k and v in the graph (zero gradients) even when all is masked
                heads.append(q[b, h] * 0.0 + (k[b, h // group].sum() + v[b, h // group].sum()) * 0.0)
                continue
            heads.append(torch.softmax(q[b, h] @ kh.T * D**-0.5, dim=-1) @ vh)
        rows.append(torch.stack(heads))
    return torch.stack(rows)


@dataclasses.dataclass
class Case:
    """One call: q [B, H, N, D], k/v [B, H_kv, N, D], a mask (or None) and a table built from a leaf tensor."""

    B: int
    H: int
    H_kv: int
    N: int
    D: int
    mask: torch.Tensor | None
    make_table: Callable[[torch.dtype], tuple[torch.Tensor | None, CosSinTable | None]]  # dtype -> (leaf, table)


def _run(name: str, case: Case, dtype: torch.dtype, gen_state):
    """o, dq, dk, dv, d leaf of backend `name` (or the reference for name None) in `dtype`."""
    gen = torch.Generator().set_state(gen_state)
    q = torch.randn(case.B, case.H, case.N, case.D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(case.B, case.H_kv, case.N, case.D, generator=gen, dtype=torch.float64) for _ in "kv")
    do = torch.randn(case.B, case.H, case.N, case.D, generator=gen, dtype=torch.float64)
    q, k, v, do = (t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, do))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    leaf, table = case.make_table(dtype)
    mask = None if case.mask is None else case.mask.to(DEVICE)
    if name is None:
        o = reference(q, k, v, table, mask)
    else:
        o = attnhub.attention(q, k, v, table, backend=name, key_padding_mask=mask)
    inputs = [q, k, v] + ([leaf] if leaf is not None else [])
    return [o.detach(), *torch.autograd.grad(o, inputs, do)]


def why_not(name: str, q, k, v, table, mask=None) -> str:
    """Why backend `name` cannot run this call when forced ("" when it can), as `test_parity.available`."""
    if why := available(name, q, k, v, table):
        return why
    try:
        return "; ".join(attnhub.explain(q, k, v, table, backend=name, key_padding_mask=mask).reasons[name])
    except attnhub.BackendUnavailableError as exc:
        return str(exc)


def check(name: str, case: Case, seed: int = 0, *, skip: bool = True) -> bool:
    """Backend `name` against `reference` in float64 and float32 (inputs and the table's leaf in that dtype),
    in those of the two dtypes the backend can run. When it can run neither: skip the test, or with
    `skip=False` return False."""
    gen = torch.Generator().manual_seed(seed)
    state = gen.get_state()
    mask = None if case.mask is None else case.mask.to(DEVICE)
    why = {}
    for dtype in (torch.float64, torch.float32):
        q = torch.zeros(case.B, case.H, case.N, case.D, device=DEVICE, dtype=dtype)
        kv = torch.zeros(case.B, case.H_kv, case.N, case.D, device=DEVICE, dtype=dtype)
        why[dtype] = why_not(name, q, kv, kv, case.make_table(dtype)[1], mask)
    if all(why.values()):
        if not skip:
            return False
        pytest.skip(f"{name} cannot run this call here: {why[torch.float32]}")
    ref = _run(None, case, torch.float64, state)
    for dtype in (d for d, w in why.items() if not w):
        got = _run(name, case, dtype, state)
        for what, a, b in zip(("o", "dq", "dk", "dv", "d table"), got, ref):
            assert a.dtype == dtype, f"{name}: {what} is {a.dtype}"
            grad = what != "o"
            if b.abs().max() == 0:  # e.g. dq with one valid key (constant softmax): no relative error to take.
                # In fp32 such a gradient is a difference of O(|o|, |dv|) terms (the softmax backward's dp - delta):
                # zero within the dtype's bound relative to the largest result of the call
                scale = max(1.0, max(float(r.abs().max()) for r in ref))
                assert a.abs().max() <= bound(dtype, grad=grad) * scale, \
                    f"{name} {dtype} {what}: {a.abs().max():.3e} != 0 (scale {scale:.2f})"
                continue
            assert_close_rel(a, b, dtype, f"{name} {dtype} {what}", grad=grad)
        if case.mask is not None:  # masked keys get exactly zero gradient; a sample without keys, all zero
            dk, dv = got[2], got[3]
            hidden = ~case.mask.to(DEVICE)
            assert (dk.transpose(1, 2)[hidden] == 0).all() and (dv.transpose(1, 2)[hidden] == 0).all()
            empty = ~case.mask.any(-1).to(DEVICE)
            for what, t in zip(("o", "dq"), got[:2]):
                assert (t[empty] == 0).all(), f"{name}: {what} of a sample with no valid key is not zero"
    return True


def _axial(grid, D, P, layout="interleaved"):
    """A shared axial table (no leaf)."""
    return lambda dtype: (None, CosSinTable(grid=grid, head_dim=D, prefix_tokens=P, layout=layout, device=DEVICE))


def _emb_table(B: int | None, heads: int | None, n: int, D: int, P: int, layout: str, seed: int):
    """timm-style cat(sin, cos) of random angles as a leaf: [(B,) 1|H, n, 2D] (per sample when B is given)."""
    def make(dtype):
        g = torch.Generator().manual_seed(seed)
        lead = ((B,) if B is not None else ()) + ((heads,) if heads else ((1,) if B is not None else ()))
        ang = torch.rand(*lead, n, D // 2, generator=g, dtype=torch.float64) * 6
        ang = ang.repeat_interleave(2, -1) if layout == "interleaved" else torch.cat([ang, ang], -1)
        emb = torch.cat([ang.sin(), ang.cos()], -1).to(DEVICE, dtype).requires_grad_()
        return emb, CosSinTable.from_sin_cos(emb, prefix_tokens=P, layout=layout)
    return make


def _coords_table(coords: torch.Tensor, freqs: torch.Tensor, P: int, layout: str, leaf: str | None = "freqs"):
    """from_coords with `leaf` ("freqs", "coords", or None: neither) requiring grad."""
    def make(dtype):
        c, f = coords.to(DEVICE, dtype).clone(), freqs.to(DEVICE, dtype).clone()
        if leaf is None:
            return None, CosSinTable.from_coords(c, f, prefix_tokens=P, layout=layout)
        (f if leaf == "freqs" else c).requires_grad_()
        return (f if leaf == "freqs" else c), CosSinTable.from_coords(c, f, prefix_tokens=P, layout=layout)
    return make


def _grid_coords(gh, gw):
    y, x = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([y, x], -1).reshape(-1, 2).double()


def _random_mask(B: int, N: int, P: int, seed: int, p_valid: float = 0.6, empty: tuple[int, ...] = ()):
    """bool [B, N]: prefix tokens always valid (as timm's create_attention_mask), patches with probability
    p_valid, samples in `empty` with no valid key at all."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, N, generator=g) < p_valid
    mask[:, :P] = True
    mask[list(empty)] = False
    return mask


# ----------------------------------------------------------------------------------------------- key padding
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("P", [0, 1, 4])
@pytest.mark.parametrize("table", ["none", "axial", "emb_per_sample"])
def test_key_padding(name, P, table):
    B, H, grid, D = 3, 2, (3, 4), 16
    N = P + grid[0] * grid[1]
    make = {
        "none": lambda dtype: (None, None),
        "axial": _axial(grid, D, P),
        "emb_per_sample": _emb_table(B, None, grid[0] * grid[1], D, P, "half", seed=4),
    }[table]
    check(name, Case(B, H, H, N, D, _random_mask(B, N, P, seed=P), make), seed=1)


@pytest.mark.parametrize("name", BACKENDS)
def test_key_padding_sample_without_valid_key(name):
    """The middle sample has no valid key (P = 0): o = 0 there, zero gradients; the others are unaffected."""
    B, H, D, N = 3, 2, 16, 12
    check(name, Case(B, H, H, N, D, _random_mask(B, N, 0, seed=9, empty=(1,)), _axial((3, 4), D, 0)), seed=2)


@pytest.mark.parametrize("name", BACKENDS)
def test_key_padding_everything_valid_equals_no_mask(name):
    """In float64, or float32 where the backend cannot run float64."""
    for dtype in (torch.float64, torch.float32):
        q, k, v = (torch.randn(2, 2, 7, 16, device=DEVICE, dtype=dtype) for _ in "qkv")
        table = CosSinTable(grid=(2, 3), head_dim=16, device=DEVICE)
        mask = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
        if not (why := why_not(name, q, k, v, table, mask)):
            break
    if why:
        pytest.skip(why)
    got = attnhub.attention(q, k, v, table, backend=name, key_padding_mask=mask)
    assert_close_rel(got, attnhub.attention(q, k, v, table, backend=name), dtype)


# -------------------------------------------------------------------------------------- grouped k/v heads
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("H_kv", [6, 3, 2, 1], ids=lambda h: f"ratio{6 // h}")
@pytest.mark.parametrize("table", ["none", "axial", "coords_per_sample", "emb_per_sample"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_grouped_kv_heads(name, H_kv, table, masked):
    B, H, grid, D, P = 2, 6, (2, 3), 16, 1
    n = grid[0] * grid[1]
    N = P + n
    g = torch.Generator().manual_seed(H_kv)
    make = {
        "none": lambda dtype: (None, None),
        "axial": _axial(grid, D, P, "half"),
        "coords_per_sample": _coords_table(torch.rand(B, n, 2, generator=g, dtype=torch.float64) * 8,
                                           axial_freqs(D).double(), P, "interleaved"),
        "emb_per_sample": _emb_table(B, None, n, D, P, "interleaved", seed=H_kv),
    }[table]
    mask = _random_mask(B, N, P, seed=H_kv) if masked else None
    check(name, Case(B, H, H_kv, N, D, mask, make), seed=3)


# ------------------------------------------------------------------------------------------ per-sample tables
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_per_sample_tables(name, layout, per_head):
    """timm NaFlex's [B, 1, N, 2D] (axial) and [B, H, N, 2D] (RoPE-Mixed), gradient into emb."""
    B, H, n, D, P = 3, 2, 10, 32, 1
    make = _emb_table(B, H if per_head else None, n, D, P, layout, seed=7)
    check(name, Case(B, H, H, P + n, D, _random_mask(B, P + n, P, seed=3), make), seed=4)


# -------------------------------------------------------------------------------------------- from coordinates
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_integer_coords_equal_the_table(name, layout):
    """from_coords(grid coords, axial_freqs(D)) gives exactly the axial table, so exactly its output."""
    grid, D, P = (3, 4), 32, 1
    q, k, v = (torch.randn(2, 2, P + 12, D, device=DEVICE) for _ in "qkv")
    table = CosSinTable(grid=grid, head_dim=D, prefix_tokens=P, layout=layout, device=DEVICE)
    coords = CosSinTable.from_coords(_grid_coords(*grid).float().to(DEVICE), axial_freqs(D).to(DEVICE),
                                     prefix_tokens=P, layout=layout)
    if why := why_not(name, q, k, v, coords):
        pytest.skip(why)
    got, want = attnhub.attention(q, k, v, coords, backend=name), attnhub.attention(q, k, v, table, backend=name)
    if name in ANGLES_IN_KERNEL or DEVICE == "cuda":
        # its own cos and sin of the same fp32 angles; on CUDA y*f0 + x*f1 contracts into one FMA where the grid
        # table's angles round twice: equal to fp32 round-off
        assert_close_rel(got, want, torch.float32, f"{name} coords vs table")
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("batched", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("per_head", [False, True], ids=["freqs", "freqs_per_head"])
@pytest.mark.parametrize("leaf", ["freqs", "coords", None], ids=["freqs", "coords", "fixed"])
def test_random_float_coords(name, batched, per_head, leaf):
    """Arbitrary float coordinates and learnable frequencies (RoPE-Mixed), gradients to freqs or coords; fixed ones
    (no table gradient: triton_rope_sdpa computes the angles in its kernel)."""
    B, H, n, D, P = 2, 3, 9, 16, 2
    g = torch.Generator().manual_seed(11)
    coords = torch.rand(*((B,) if batched else ()), n, 2, generator=g, dtype=torch.float64) * 10 - 2
    freqs = torch.randn(*((H,) if per_head else ()), D // 2, 2, generator=g, dtype=torch.float64)
    check(name, Case(B, H, H, P + n, D, _random_mask(B, P + n, P, seed=5), _coords_table(coords, freqs, P,
                                                                                          "half", leaf)), seed=5)


# ------------------------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize("name", BACKENDS)
def test_augmented_coords_naflex_batch(name):
    """A NaFlex-like batch: three grids padded to one length (padding coords 0, masked), coordinates augmented
    per sample, learnable RoPE-Mixed frequencies, 6 query heads on 2 k/v heads."""
    grids, L, P, H, H_kv, D = [(3, 4), (2, 5), (4, 3)], 12, 1, 6, 2, 16
    coords = torch.zeros(len(grids), L, 2, dtype=torch.float64)
    mask = torch.zeros(len(grids), P + L, dtype=torch.bool)
    mask[:, :P] = True
    for b, (gh, gw) in enumerate(grids):
        coords[b, : gh * gw] = _grid_coords(gh, gw)
        mask[b, P : P + gh * gw] = True
    coords = augment_coords(coords, shift=1.0, jitter=1.3, rescale=1.5, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(coords[0, :6], coords[2, :6]), "each sample draws its own transform"
    freqs = torch.randn(D // 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    check(name, Case(len(grids), H, H_kv, P + L, D, mask, _coords_table(coords, freqs, P, "interleaved")), seed=6)
