"""The Gluon kernels of triton_fa_rope's split backward (`gluon_bwd`: dK/dV and dQ): which calls take them, and on a
Hopper GPU the gradients of whole calls through them against `math` in float64 (Gluon has no interpreter: on CPU
only the planning tests run; test_sm90.py compiles its launches for sm_90 offline).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnhub
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import configs, launch
from tests.helpers import Shape, assert_close_rel, make_emb, make_qkv, make_table, plan_as_compiled

gluon_bwd = launch._gluon("gluon_bwd")
pytestmark = pytest.mark.skipif(gluon_bwd is None, reason="this Triton has no Gluon Hopper API")
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
HOPPER = configs.for_arch(9, 64)
ON = dict(gluon_bwd_from_n=0)  # every split backward that the kernel can take


@pytest.fixture(autouse=True)
def compiled_code(monkeypatch):
    """Plan as compiled code does (on CPU the interpreter takes no Gluon kernel)."""
    plan_as_compiled(monkeypatch)


def _backward_launches(q, k, v, table, mask=None, constexprs=False, **fields) -> list:
    """The kernel names of a split backward of this call with the Hopper table (fields replaced), recorded (with
    `constexprs`: (name, constexprs) pairs)."""
    config = dataclasses.replace(HOPPER, **fields)
    names = []

    def record(kernel, grid, args, num_warps, num_stages, **given):
        names.append((kernel.fn.__name__, given) if constexprs else kernel.fn.__name__)

    o, lse, (qr, kr) = launch.forward(q, k, v, table, 0.125, True, config, record, mask)
    names.clear()
    launch.backward(torch.empty_like(q), qr, kr, v, o, lse, table, 0.125, config, False, record, mask)
    return names


def _case(N=577, H=3, dtype=torch.bfloat16, kind="fused", layout="interleaved", per_head=False, P=1):
    q, k, v = make_qkv(kind, 2, H, N, 64, dtype, torch.Generator().manual_seed(0))
    return q, k, v, make_table(Shape(2, H, (1, N - P), P, 64, layout, per_head=per_head), torch.Generator())


TRITON = ["bwd_preprocess", "bwd_dkdv_kernel", "bwd_dq_kernel"]
GLUON = ["gluon_dq_kernel", "gluon_dkdv_kernel"]  # the dQ kernel first: it computes delta (`delta_in_dq`)


def test_the_hopper_table_takes_them_from_gluon_bwd_from_n():
    """From the table's length on the split backward's dK/dV and dQ kernels are the Gluon ones, the dQ kernel first
    computing delta (no delta pass); below it, with the field None, and for a kernel whose config is None,
    Triton's, after the delta pass."""
    from_n = HOPPER.gluon_bwd_from_n
    assert HOPPER.gluon_dkdv is not None and HOPPER.gluon_dq is not None and from_n is not None
    assert HOPPER.delta_in_dq
    assert _backward_launches(*_case(N=from_n)) == GLUON
    assert _backward_launches(*_case(N=from_n), delta_in_dq=False) == ["bwd_preprocess", *GLUON]
    assert _backward_launches(*_case(N=from_n - 1)) == TRITON
    assert _backward_launches(*_case(N=from_n), gluon_bwd_from_n=None) == TRITON
    assert _backward_launches(*_case(N=from_n), gluon_dq=None) == ["bwd_preprocess", "gluon_dkdv_kernel",
                                                                    "bwd_dq_kernel"]
    assert _backward_launches(*_case(N=from_n), gluon_dkdv=None) == ["gluon_dq_kernel", "bwd_dkdv_kernel"]
    assert configs.for_arch(8, 64).gluon_bwd_from_n is None and configs.for_arch(9, 128).gluon_bwd_from_n is None


@pytest.mark.parametrize("why", ["mask", "fp32", "head_dim", "grouped", "cross", "half", "per_sample", "unaligned",
                                 "norope_ok", "per_head_ok"])
def test_leaves_other_calls_to_the_triton_kernel(why):
    """Calls it cannot take run Triton's dK/dV kernel, with the same results (the rest of the suite checks them)."""
    q, k, v, table = _case(dtype=torch.float32 if why == "fp32" else torch.bfloat16,
                           layout="half" if why == "half" else "interleaved", per_head=why == "per_head_ok")
    mask = None
    if why == "mask":
        mask = torch.ones(2, q.shape[2], dtype=torch.bool)
    elif why == "head_dim":
        q, k, v = make_qkv("fused", 2, 3, 577, 80, torch.bfloat16, torch.Generator())
        table = make_table(Shape(2, 3, (1, 576), 1, 80, "interleaved"), torch.Generator())
    elif why == "grouped":
        k, v = k[:, :1], v[:, :1]
    elif why == "cross":
        table = None
        k, v = (torch.empty(2, 3, 300, 64, dtype=q.dtype) for _ in "kv")
    elif why == "per_sample":
        emb = make_emb(Shape(2, 3, (1, 576), 1, 64, "interleaved"), torch.Generator(), heads=False)
        table = attnhub.CosSinTable.from_sin_cos(emb.expand(2, 1, -1, -1), prefix_tokens=1, layout="interleaved")
    elif why == "unaligned":  # TMA needs 16-byte aligned strides: 3 tokens of 66 channels are not (v is read as
        v = torch.randn(2, 577, 3, 66, dtype=q.dtype)[..., :64].transpose(1, 2)  # given; q, k as rotated)
    elif why == "norope_ok":
        table = None
    names = _backward_launches(q, k, v, table, mask, **ON)
    expected = GLUON if why.endswith("_ok") else TRITON
    assert names[-len(expected):] == expected and "bwd_preprocess" not in names[:-len(expected)]


@pytest.mark.parametrize("field,cfg", [("gluon_dkdv", (64, 64, 8, 3)), ("gluon_dq", (64, 64, 8, 3)),
                                       ("gluon_dq", (64, 32, 4, 2)), ("gluon_dkdv", (64, 64, 4, 1))])
def test_a_config_they_cannot_run_is_an_error(field, cfg):
    q, k, v, table = _case()
    with pytest.raises(ValueError, match=f"{field} .* needs its resident rows = 16 \\* num_warps"):
        _backward_launches(q, k, v, table, **ON, **{field: configs.KernelConfig(*cfg)})


@pytest.mark.parametrize("N,block,rows", [(577, 64, 16), (1029, 64, 16), (401, 64, 32), (640, 64, 0), (1, 64, 16),
                                          (33, 64, 0), (48, 64, 0), (129, 128, 16), (160, 128, 32), (200, 128, 0)])
def test_the_last_block_is_only_as_wide_as_its_rows_need(N, block, rows):
    assert gluon_bwd.tail_rows(N, block) == rows


@pytest.mark.parametrize("N,block,on,rows", [(577, 64, True, 16), (1029, 64, True, 16), (65, 64, True, 16),
                                             (1, 64, True, 0), (16, 64, True, 0),
                                             (592, 64, True, 16), (593, 64, True, 0), (640, 64, True, 0),
                                             (577, 128, True, 0), (577, 64, False, 0)])
def test_a_last_resident_block_of_few_rows_runs_swapped_where_switched_on(N, block, on, rows):
    """`bwd_swap_tail`: at most 16 valid rows of a head's last 64-row resident block (one warpgroup's) where the head
    has several; never with 128."""
    config = dataclasses.replace(HOPPER, bwd_swap_tail=on)
    assert gluon_bwd.swap_rows(N, block, 64, config) == rows


def test_the_swapped_tails_reach_the_launches():
    """The plan passes SWAP_K and SWAP_Q (16 at N = 577 with the switch on, as the Hopper table has it; 0 off or with
    128-row blocks)."""
    q, k, v, table = _case(N=577)
    for fields, swap in (({}, 16), (dict(bwd_swap_tail=False), 0),
                         (dict(bwd_swap_tail=True, gluon_dkdv=K(64, 128, 8, 3), gluon_dq=K(128, 64, 8, 2)), 0)):
        launches = dict(_backward_launches(q, k, v, table, constexprs=True, **ON, **fields))
        assert (launches["gluon_dkdv_kernel"]["SWAP_K"], launches["gluon_dq_kernel"]["SWAP_Q"]) == (swap, swap)


# ------------------------------------------------------------------------------------------------- on the GPU
gpu = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU")


def _reference(q, k, v, table):
    return attnhub.attention(q.double(), k.double(), v.double(), table, backend="math")


FLOAT64_CASES = [  # N, prefix, table, layout of q, k, v; keys in blocks of 128 (64 with 4 warps), queries of 64
    (577, 1, "shared", "fused"),  # ViT/16 at 384 px: the last key block 65 keys, the last query block one
    (577, 1, "per_head", "contiguous"),
    (1029, 5, "shared", "fused"),  # ViT/16 at 512 px with 4 registers
    (401, 0, None, "transposed"),
    (640, 0, "shared", "fused"),  # whole blocks
    (257, 1, "shared", "contiguous"),
    (129, 1, None, "fused"),  # one key past a block
    (1, 1, "shared", "fused"),  # the prefix token alone
]
K = configs.KernelConfig
CONFIGS = {  # name -> config fields: the table's (a head's last resident block swapped at 577, 1029, 257, 129);
    "table": {},  # two warpgroups; three buffers, every last block whole, the delta pass; no block swapped, with
    # delta in dQ and with the delta pass
    "w8": dict(gluon_dkdv=K(64, 128, 8, 3), gluon_dq=K(128, 64, 8, 2)),
    "s3_wide": dict(gluon_dkdv=K(64, 64, 4, 3, 168), gluon_dq=K(64, 64, 4, 3), narrow_tail=False, delta_in_dq=False),
    "unswapped": dict(bwd_swap_tail=False),
    "unswapped_delta_pass": dict(bwd_swap_tail=False, narrow_tail=False, delta_in_dq=False),
}
DELTA_PASS = ("s3_wide", "unswapped_delta_pass")


def _grads(q, k, v, table, do, packed: bool):
    """(o, dq, dk, dv) of one call; packed: through `attention_packed` on one [B, N, 3, H, D] leaf, so dk and dv
    are written into views of its gradient."""
    if packed:
        qkv = torch.stack([q, k, v], 2).transpose(1, 3).detach().requires_grad_()  # [B, N, 3, H, D]
        o = attnhub.attention_packed(qkv, table, backend="triton_fa_rope")
        o.backward(do)
        return o.detach(), *qkv.grad.permute(2, 0, 3, 1, 4).unbind(0)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o = attnhub.attention(*leaves, table, backend="triton_fa_rope")
    o.backward(do)
    return o.detach(), *(t.grad for t in leaves)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,P,table_kind,kind", FLOAT64_CASES)
def test_gradients_match_math_in_float64(cfg, dtype, N, P, table_kind, kind, nan_empty):
    """Whole calls (the forward by the table, the split backward with the Gluon kernels forced on) with
    NaN-filled outputs, B * H = 160 heads; the output gradient laid out [B, H, N, D] (not like o); every other
    case through `attention_packed` (dk, dv into views of one gradient)."""
    gen = torch.Generator().manual_seed(N + 7)
    B, H = 20, 8
    q, k, v = make_qkv(kind, B, H, N, 64, dtype, gen)
    table = None if table_kind is None or N == P else make_table(
        Shape(B, H, (1, N - P), P, 64, "interleaved", per_head=table_kind == "per_head"), gen)
    do = torch.randn(q.shape, generator=gen).to(q.device, dtype)
    packed = FLOAT64_CASES.index((N, P, table_kind, kind)) % 2 == 1
    with configs.override(**ON, **CONFIGS[cfg], bwd_fused_max_n=0), runtime.recording() as launches:
        o, *grads = _grads(q, k, v, table, do, packed)
    names = {x.name for x in launches}
    assert set(GLUON) <= names and not names & set(TRITON[1:])
    assert ("bwd_preprocess" in names) == (cfg in DELTA_PASS)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_leaves, table)
    ref.backward(do.double())
    assert_close_rel(o, ref.detach(), dtype, "o")
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, ref_leaves):
        if N == 1 and name != "dv":  # one key: the softmax is constant, dq and dk are zero (here round-off)
            assert got.abs().max() <= 1e-2, name
            continue
        assert_close_rel(got, leaf.grad, dtype, name, grad=True)


@pytest.mark.gpu
@gpu
def test_they_match_the_triton_kernels():
    """The same call's gradients through the Gluon and the Triton backward kernels agree to bf16 round-off (both
    read what one forward saved)."""
    q, k, v, table = _case(N=577, H=12)
    q, k, v = (t.cuda() for t in (q, k, v))
    table = make_table(Shape(2, 12, (24, 24), 1, 64, "interleaved"), torch.Generator())
    do = torch.randn_like(q)
    with configs.override(**ON):
        got = _grads(q, k, v, table, do, False)
    with configs.override(gluon_bwd_from_n=None):
        ref = _grads(q, k, v, table, do, False)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        assert_close_rel(a, b.double(), torch.bfloat16, name, grad=name != "o")


@pytest.mark.parametrize("N,layout,dtype,fused", [(100, "interleaved", torch.bfloat16, True),
                                                  (197, "interleaved", torch.bfloat16, False),
                                                  (197, "interleaved", torch.float16, False),
                                                  (197, "half", torch.bfloat16, True),
                                                  (197, "interleaved", torch.float32, True),
                                                  (256, None, torch.bfloat16, False)])
def test_short_calls_take_the_fused_backward_unless_the_gluon_kernels_serve(N, layout, dtype, fused):
    """Up to bwd_fused_max_n tokens the fused backward runs, unless the split one would run the Gluon kernels (from
    gluon_bwd_from_n on, for calls they take)."""
    q, k, v, table = _case(N=N, dtype=dtype, layout=layout or "interleaved")
    table = table if layout else None
    assert launch.use_fused_backward(dataclasses.replace(HOPPER, gluon_bwd_from_n=129), q, k, table, None,
                                     "auto") == fused
    assert launch.use_fused_backward(HOPPER, q, k, table, None, "auto") == (HOPPER.gluon_bwd_from_n > N or fused)
    assert launch.use_fused_backward(dataclasses.replace(HOPPER, gluon_bwd_from_n=None), q, k, table, None, "auto")
