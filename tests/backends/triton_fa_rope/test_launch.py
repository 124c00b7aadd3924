"""triton_fa_rope's launcher: forward paths (RoPE inside the attention kernel or K / q and K rotated first by
`rotate_kernel`, and the narrow last K tile), the last tile's width, grids; in every path also key padding, grouped
k/v heads and per-sample tables over several blocks (a whole key block masked, a sample without a valid key).

Each path is forced through `configs.override` (`prerotate_from_n`, `prerotate_train_from_n`, `narrow_tail`) and
compared with `math` in float64: output without grad, output and dq, dk, dv with grad. Every `torch.empty` buffer
is filled with NaN first (conftest's `nan_empty`), so a kernel that leaves part of its output unwritten fails.
On CPU the interpreter runs them in float32 (blocks of 32: N = 71 and 65 leave 7 and 1 keys for the last tile);
with CUDA the compiled kernels in bfloat16 and float16.
"""

from __future__ import annotations

import pytest
import torch

from attnhub import attention as attnhub_attention
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import autograd, configs, kernels, launch
from tests.helpers import (
    DEVICE, TRITON, Shape, assert_close_rel, available, make_qkv, make_table, make_tensor, run_backend,
)

SHAPES = {
    "il_p1_7x10_d64": Shape(1, 2, (7, 10), 1, 64, "interleaved"),  # N = 71
    "half_p1_8x8_d32": Shape(2, 1, (8, 8), 1, 32, "half"),  # N = 65: a last tile of one key
    "il_p5_6x12_d48": Shape(1, 2, (6, 12), 5, 48, "interleaved"),  # HEAD_D != BLOCK_D: pair loads
    "perhead_il_p0_8x9_d32": Shape(1, 2, (8, 9), 0, 32, "interleaved", per_head=True),
    "norope_p1_7x10_d64": Shape(1, 2, (7, 10), 1, 64, None),
}
# the Triton forward's rotation paths (the Gluon forward, which Hopper's table gives short inference calls, off)
NEVER = dict(prerotate_from_n=None, prerotate_train_from_n=None, resident_fwd_max_n=0)
ALWAYS = dict(prerotate_from_n=0, prerotate_train_from_n=0, resident_fwd_max_n=0)
PATHS = {  # config overrides
    "in_kernel": dict(**NEVER, narrow_tail=False),  # the default off Hopper
    "in_kernel_narrow_tail": dict(**NEVER, narrow_tail=True),
    "prerotate_narrow_tail": dict(**ALWAYS, narrow_tail=True),
    "prerotate_q_narrow_tail": dict(**ALWAYS, narrow_tail=True, prerotate_q_from_n=0),  # inference rotates q first too
}
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]


def _case(shape_name: str, kind: str, seed: int, dtype: torch.dtype = DTYPES[0]):
    """-> (shape, generator, q, k, v, table) of SHAPES[shape_name], or a skip where triton_fa_rope cannot run it."""
    s = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(kind, s.B, s.H, s.N, s.D, dtype, gen)
    table = make_table(s, gen)
    why = available(TRITON, q, k, v, table)
    if why:
        pytest.skip(why)
    return s, gen, q, k, v, table


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_forward_paths_match_math(shape_name, path, dtype, nan_empty):
    s, gen, q, k, v, table = _case(shape_name, "transposed", 21, dtype)
    do = make_tensor("contiguous", s.B, s.H, s.N, s.D, dtype, gen)
    ref = run_backend("math", *(t.double() for t in (q, k, v, do)), table)
    with configs.override(**PATHS[path]):
        got = run_backend(TRITON, q, k, v, do, table)
        with torch.no_grad():
            o = autograd.attention(q, k, v, table, s.D ** -0.5)
    for what, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        assert_close_rel(a, b, dtype, f"{path} {what}")
    assert_close_rel(o, ref[0], dtype, f"{path} inference o")


@pytest.mark.parametrize("n,block,expected", [(197, 64, 16), (192, 64, 64), (577, 64, 16), (100, 64, 64),
                                              (90, 64, 32), (71, 32, 8 * 2), (200, 128, 128), (1029, 128, 16)])
def test_tail_width(n, block, expected):
    """The last K tile: the remainder rounded up to a power of two, at least 16, at most the block."""
    assert launch.tail(n, block) == expected


@pytest.mark.parametrize("n_rows,block,bh", [(197, 64, 3), (192, 64, 1), (1, 128, 7), (1029, 32, 70_400)])
def test_grid_counts_blocks_of_every_pair(n_rows, block, bh):
    assert launch.grid(n_rows, block, bh) == -(-n_rows // block) * bh == ((n_rows + block - 1) // block) * bh


def test_grid_beyond_the_launch_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="launch-grid limit"):
        launch.grid(2**20, 1, 2**12)


@pytest.mark.parametrize("q_from", ["never", "n", "n_plus_1"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_prerotate_from_n_is_a_sequence_length_threshold(training, q_from):
    """K (and q in training, or in inference from `prerotate_q_from_n`) go through `rotate_kernel` (one launch for
    both) exactly when N >= the config's threshold for the pass; the attention kernel then rotates nothing that was
    rotated first."""
    s, _, q, k, v, table = _case("il_p1_7x10_d64", "contiguous", 3)
    field = "prerotate_train_from_n" if training else "prerotate_from_n"
    q_from_n = {"never": None, "n": s.N, "n_plus_1": s.N + 1}[q_from]
    both = training or q_from == "n"
    for from_n, rotations in ((s.N, 1), (s.N + 1, 0)):
        with configs.override(**{**NEVER, field: from_n}, prerotate_q_from_n=q_from_n), \
                runtime.recording() as launched:
            launch.forward(q, k, v, table, s.D ** -0.5, training, configs.for_call(q.device, s.D))
        kernels_launched = [x.kernel for x in launched]
        assert kernels_launched.count(kernels.rotate_kernel) == rotations, (from_n, kernels_launched)
        assert kernels_launched[-1] is kernels.fwd_kernel
        if rotations:
            assert launched[0].constexprs["TWO"] == both, launched[0].constexprs
        rope_in_kernel = launched[-1].constexprs["ROPE"]
        assert rope_in_kernel == (rotations == 0 or not both), (from_n, rope_in_kernel)


class _GluonServesNothing:
    """A stand-in for `gluon_fwd` that takes no call (as while its kernel compiles in the background), recording
    what it was handed."""

    def __init__(self):
        self.calls = []

    def forward(self, q, k, v, rope, qk_scale, launch_, save_rotated=False, options=None):
        self.calls.append((q, k, rope, save_rotated))


@pytest.mark.parametrize("shape_name", [name for name, s in SHAPES.items() if s.layout is not None])
def test_training_after_the_rotation_pass_for_the_gluon_forward_matches_math(shape_name, monkeypatch, nan_empty):
    """`gluon_prerotate_train_from_n`: a training call the Gluon forward may take rotates q and k first and hands
    them to it without RoPE; where it takes none, the Triton kernel attends on the rotated pair (no rotation of its
    own, no second pass) and the backward reads that pair: o and the gradients against math in float64."""
    s, gen, q, k, v, table = _case(shape_name, "transposed", 5)
    gluon = _GluonServesNothing()
    monkeypatch.setattr(launch, "_resident_forward", lambda config, n, training: gluon)
    do = make_tensor("contiguous", s.B, s.H, s.N, s.D, q.dtype, gen)
    ref = run_backend("math", *(t.double() for t in (q, k, v, do)), table)
    with configs.override(**NEVER, gluon_prerotate_train_from_n=s.N), runtime.recording() as launched:
        got = run_backend(TRITON, q, k, v, do, table)
    for what, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        assert_close_rel(a, b, q.dtype, what)
    forward = [x for x in launched if x.kernel in (kernels.rotate_kernel, kernels.fwd_kernel)]
    assert [x.kernel for x in forward] == [kernels.rotate_kernel, kernels.fwd_kernel]
    assert forward[0].constexprs["TWO"] and not forward[1].constexprs["ROPE"]
    # each forward (on CUDA a dry run compiling ahead too) hands the Gluon forward the rotated pair once, without
    # its table, never q and k with it
    assert gluon.calls and all(q_in is not q and k_in is not k for q_in, k_in, _, _ in gluon.calls)
    for qr, kr, rope, save_rotated in gluon.calls:
        assert rope is None and not save_rotated and qr.is_contiguous() and kr.is_contiguous()
    assert len(gluon.calls) == len({id(c[0]) for c in gluon.calls})  # one hand-over per rotated pair


def test_the_rotation_pass_for_the_gluon_forward_starts_at_its_length(monkeypatch):
    """Below `gluon_prerotate_train_from_n`, and in inference, the Gluon forward gets the call with its table."""
    s, _, q, k, v, table = _case("il_p1_7x10_d64", "contiguous", 3)
    gluon = _GluonServesNothing()
    monkeypatch.setattr(launch, "_resident_forward", lambda config, n, training: gluon)
    for training, from_n in ((True, s.N + 1), (False, 0)):
        gluon.calls.clear()
        with configs.override(**NEVER, gluon_prerotate_train_from_n=from_n):
            launch.forward(q, k, v, table, s.D ** -0.5, training, configs.for_call(q.device, s.D))
        assert [c[2] for c in gluon.calls] == [table], (training, from_n)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_the_forward_after_the_rotation_pass_has_its_own_config(training):
    """fwd_prerotated (fwd_train_prerotated) launches the attention kernel after the rotation pass, fwd (fwd_train)
    without it, and None falls back to the latter."""
    s, _, q, k, v, table = _case("il_p1_7x10_d64", "contiguous", 3)
    own, base = configs.KernelConfig(16, 32, 1, 1), configs.KernelConfig(32, 16, 1, 1)
    names = ("fwd_train_prerotated", "fwd_train") if training else ("fwd_prerotated", "fwd")
    threshold = "prerotate_train_from_n" if training else "prerotate_from_n"
    for from_n, prerotated, expected in ((s.N, own, own), (s.N + 1, own, base), (s.N, None, base)):
        fields = {**NEVER, threshold: from_n, names[0]: prerotated, names[1]: base}
        with configs.override(**fields), runtime.recording(run=False) as launched:
            launch.forward(q, k, v, table, s.D ** -0.5, training, configs.for_call(q.device, s.D))
        cx = launched[-1].constexprs
        assert launched[-1].kernel is kernels.fwd_kernel and (cx["BLOCK_M"], cx["BLOCK_N"]) == expected[:2]


def test_config_tables_cover_their_buckets():
    """Every table answers every head dim up to `LIMITS` and names a larger one."""
    for major in (None, 8, 9):
        for D in (16, 32, 48, 64, 80, 128, 200, 256):
            assert D <= configs.for_arch(major, D).max_head_dim
        with pytest.raises(ValueError, match="head_dim 512 > 256"):
            configs.for_arch(major, 512)
    assert configs.LIMITS == {"head_dim": {"max": 256}}


def test_config_override_replaces_fields_and_restores():
    cpu = torch.device("cpu")
    base = configs.for_call(cpu, 64)
    with configs.override(narrow_tail=True, fwd=configs.KernelConfig(16, 16, 1, 1)):
        with configs.override(bwd_fused_max_n=7):
            got = configs.for_call(cpu, 64)
            assert (got.narrow_tail, got.fwd, got.bwd_fused_max_n) == (True, configs.KernelConfig(16, 16, 1, 1), 7)
        assert configs.for_call(cpu, 64).bwd_fused_max_n == base.bwd_fused_max_n
    assert configs.for_call(cpu, 64) == base
    with pytest.raises(TypeError, match="unknown field.*nonesuch"):
        with configs.override(nonesuch=1):
            pass


# name: (H, H_kv, per-sample table); every case has a key padding mask (sample 0: its first key block masked,
# sample 1: no valid key, sample 2: random keys up to 30, then padding, sample 3: every key valid, sample 4: keys up
# to 45 valid, then padding: its first key block runs without the mask, as NaFlex batches' do)
VARLEN = {
    "mask": (2, 2, False),
    "mask_gqa3": (3, 1, False),
    "mask_gqa2_per_sample": (4, 2, True),
}


def _varlen_mask(B: int, N: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.rand(B, N, generator=gen) < 0.6
    mask[0, :40] = False  # a whole key block of 32 (and part of the next) hidden, the prefix token too
    mask[1] = False
    mask[2, 30:] = False  # padding at the end (as NaFlex batches pad): the kernels skip the tiles past key 29
    mask[3] = True
    mask[4] = torch.arange(N) < 45
    return mask.to(DEVICE)


def test_key_bounds_are_the_first_masked_and_one_past_the_last_valid_key():
    """`key_bounds_kernel` against PyTorch, over masks longer than its step (BOUNDS_BLOCK)."""
    N = launch.BOUNDS_BLOCK + 37
    mask = torch.rand(6, N, generator=torch.Generator().manual_seed(5)) < 0.5
    mask[0], mask[1] = True, False
    mask[2] = torch.arange(N) < launch.BOUNDS_BLOCK + 3
    mask[3] = torch.arange(N) >= 600
    mask = mask.to(DEVICE)
    q = torch.empty(6, 1, N, 32, device=DEVICE)
    _, bounds, _, _ = launch._varlen_args(q, q, q, mask, runtime.launch)
    pos = torch.arange(N, device=DEVICE)
    first = torch.where(mask, N, pos).amin(1)
    end = torch.where(mask, pos + 1, 0).amax(1)
    assert bounds.tolist() == torch.stack((first, end), 1).tolist()
    assert bounds[0].tolist() == [N, N] and bounds[1].tolist() == [0, 0]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(VARLEN))
def test_varlen_paths_match_math(case, path, nan_empty):
    """Key padding, grouped k/v heads and per-sample tables over several query and key blocks (N = 71), in every
    forward path, against `math` in float64: o and the gradients of q, k, v and the table's embedding. The fused
    backward is requested and must not run (it reads no mask, groups or batch stride): the split kernels do."""
    from attnhub import CosSinTable, settings

    H, H_kv, per_sample = VARLEN[case]
    B, grid, P, D, dtype = 5, (7, 10), 1, 32, DTYPES[0]
    N = P + grid[0] * grid[1]
    gen = torch.Generator().manual_seed(31)
    q = make_tensor("transposed", B, H, N, D, dtype, gen)
    k, v = (make_tensor("transposed", B, H_kv, N, D, dtype, gen) for _ in "kv")
    do = make_tensor("contiguous", B, H, N, D, dtype, gen)
    mask = _varlen_mask(B, N, gen)
    ang = torch.rand(*((B, 1) if per_sample else ()), N - P, D // 2, generator=gen) * 6
    emb = torch.cat([ang.sin(), ang.cos()], -1).repeat_interleave(2, -1).to(DEVICE, dtype)

    def run(name, q, k, v, do, emb):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, emb)]
        table = CosSinTable.from_sin_cos(leaves[-1], prefix_tokens=P, layout="interleaved")
        o = attnhub_attention(*leaves[:3], table, backend=name, key_padding_mask=mask)
        return [o.detach(), *torch.autograd.grad(o, leaves, do)]

    ref = run("math", *(t.double() for t in (q, k, v, do, emb)))
    with configs.override(**PATHS[path]), settings.override(triton_bwd="fused"), runtime.recording() as launched:
        got = run(TRITON, q, k, v, do, emb)
    names = [x.name for x in launched]
    assert "bwd_fused_kernel" not in names and {"bwd_dkdv_kernel", "bwd_dq_kernel"} <= set(names), names
    for what, a, b in zip(("o", "dq", "dk", "dv", "d emb"), got, ref):
        assert_close_rel(a, b, dtype, f"{case} {path} {what}", grad=what != "o")
    o, dq, dk, dv = got[:4]
    assert (o[1] == 0).all() and (dq[1] == 0).all(), "a sample without a valid key: o and dq must be 0"
    hidden = ~mask
    assert (dk.transpose(1, 2)[hidden] == 0).all() and (dv.transpose(1, 2)[hidden] == 0).all()


def test_a_register_cap_reaches_the_dq_launch_as_an_option():
    """`KernelConfig.maxnreg` goes to `kernel[grid](...)` as Triton's `maxnreg` option, and only where set: on
    Hopper at D = 64 the dq launch is capped (with and without a key padding mask), every other launch not but the
    warp-specialized Gluon forward, which carries its own."""
    from attnhub.backends.triton_fa_rope import gluon_kernels
    from tests.backends.triton_fa_rope.sm90 import CASES, case_inputs, training_step_launches

    assert configs.KernelConfig(16, 16, 1, 1).options() == {}
    assert configs.KernelConfig(16, 16, 1, 1, 128).options() == {"maxnreg": 128}
    q, k, v, rope, mask = case_inputs(*CASES["d64_bf16_mask"])
    for key_padding_mask in (mask, None):
        capped = {launch.name: launch.constexprs.get("maxnreg")
                  for launch in training_step_launches(q, k, v, rope, key_padding_mask)}
        assert capped.pop("bwd_dq_kernel") == 128
        # the warp-specialized Gluon forward's own cap (its registers split between its warpgroups), where it runs
        # (without a mask, on a Hopper GPU)
        assert capped.pop("resident_ws_fwd_kernel", gluon_kernels.WS_MAXNREG) == gluon_kernels.WS_MAXNREG
        assert set(capped.values()) == {None}, capped
