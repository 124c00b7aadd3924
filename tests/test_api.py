"""attnhub/api.py (and the public names of attnhub/__init__.py): forcing precedence, use_backend, explain,
run-time registration, autocast, scale, strided inputs, input validation, `attnhub.list_backends()`.
`attnhub.tune()` is tested in tests/test_tune.py.

On CPU the Triton backend runs forced, under the interpreter (conftest sets TRITON_INTERPRET=1), at tiny shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnhub
from tests.helpers import assert_close_rel, device_for

BACKENDS = ["math", "torch_sdpa", "triton_fa_rope"]
HAS_CUDA = torch.cuda.is_available()


def _qkv(dtype=torch.float32, B=2, H=2, N=7, D=16, N_kv=None, seed=0, device="cpu"):
    """q: [B, H, N, D], k, v: [B, H, N_kv, D], fresh random."""
    g = torch.Generator().manual_seed(seed)
    N_kv = N if N_kv is None else N_kv
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype).to(device)
    k, v = (torch.randn(B, H, N_kv, D, generator=g, dtype=dtype).to(device) for _ in range(2))
    return q, k, v


def _table(D=16, grid=(2, 3), prefix=1, layout="interleaved"):
    return attnhub.CosSinTable(grid=grid, head_dim=D, prefix_tokens=prefix, layout=layout)


def _reference(q, k, v, rope=None, scale=None):
    """float64 math backend on the same inputs: o [B, H, N, D] float64."""
    return attnhub.attention(q.double(), k.double(), v.double(), rope, scale=scale, backend="math")


def _recorder(name: str, calls: list):
    ref = attnhub.REGISTRY.entry("math")

    def fn(q, k, v, rope, scale):
        calls.append(name)
        return ref(q, k, v, rope, scale)

    return fn


@pytest.fixture
def toys():
    """Three low-priority CPU backends that record their name in the returned list when they run."""
    calls: list[str] = []
    for i, name in enumerate(("toy_call", "toy_ctx", "toy_env")):
        attnhub.register_backend(name, _recorder(name, calls), priority=-10 - i, devices=["cpu"])
    return calls


# ------------------------------------------------------------------------------------------ forcing precedence
def _ran(calls, q, k, v, **kw) -> str:
    """Which backend `attention` ran ('torch_sdpa' when no toy recorded), checked against `explain`."""
    before = len(calls)
    attnhub.attention(q, k, v, **kw)
    name = calls[-1] if len(calls) > before else "torch_sdpa"
    assert attnhub.explain(q, k, v, **kw).chosen == name
    return name


def test_precedence_per_call_over_context_over_env_over_automatic(toys, monkeypatch):
    q, k, v = _qkv()
    assert _ran(toys, q, k, v) == "torch_sdpa"
    monkeypatch.setenv("ATTNHUB_BACKEND", "toy_env")
    assert _ran(toys, q, k, v) == "toy_env"
    with attnhub.use_backend("toy_ctx"):
        assert _ran(toys, q, k, v) == "toy_ctx"
        assert _ran(toys, q, k, v, backend="toy_call") == "toy_call"
        why = attnhub.explain(q, k, v, backend="toy_call")
        assert why.how == "forced" and why.forced == "toy_call"
        assert "chosen: toy_call (forced by the backend= argument)" in str(why)
    assert _ran(toys, q, k, v) == "toy_env"
    monkeypatch.delenv("ATTNHUB_BACKEND")
    assert _ran(toys, q, k, v) == "torch_sdpa"
    assert _ran(toys, q, k, v, backend="toy_call") == "toy_call"


def test_nested_contexts_and_none_restores_automatic(toys):
    q, k, v = _qkv()
    with attnhub.use_backend("toy_ctx"):
        with attnhub.use_backend("toy_env"):
            assert _ran(toys, q, k, v) == "toy_env"
            with attnhub.use_backend(None):
                assert _ran(toys, q, k, v) == "torch_sdpa"
            assert _ran(toys, q, k, v) == "toy_env"
        assert _ran(toys, q, k, v) == "toy_ctx"
    assert _ran(toys, q, k, v) == "torch_sdpa"


def test_context_is_restored_after_an_exception(toys):
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="boom"):
        with attnhub.use_backend("toy_ctx"):
            raise RuntimeError("boom")
    assert _ran(toys, q, k, v) == "torch_sdpa"


def test_use_backend_name_must_be_str():
    with pytest.raises(TypeError, match="name must be a str or None, got int"):
        with attnhub.use_backend(3):
            pass


def test_env_backend_unknown_is_reported(monkeypatch):
    monkeypatch.setenv("ATTNHUB_BACKEND", "nonesuch")
    with pytest.raises(attnhub.UnknownBackendError, match="'nonesuch'"):
        attnhub.attention(*_qkv())


# ------------------------------------------------------------------------------------ explain and registration
def test_registered_backend_is_selected_and_explained():
    calls: list[str] = []
    attnhub.register_backend("toy", _recorder("toy", calls), priority=1000, devices=["cpu"], dtypes=["float32"],
                             head_dim={"multiple_of": 8})
    q, k, v = _qkv(D=16)
    why = attnhub.explain(q, k, v)
    assert why.chosen == "toy" and "chosen: toy (highest priority)" in str(why)
    assert "torch_sdpa: eligible, not chosen" in str(why)
    o = attnhub.attention(q, k, v)
    assert calls == ["toy"]
    assert_close_rel(o, _reference(q, k, v), torch.float32)
    # rejected with its own reason where its constraints fail
    why = attnhub.explain(*_qkv(D=12))
    assert why.chosen == "torch_sdpa" and "head_dim 12 is not a multiple of 8" in why.reasons["toy"]


# ------------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("ac_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_output_dtype_for_every_backend(backend, ac_dtype):
    dev = device_for(backend)
    q, k, v = _qkv(torch.float32, device=dev)
    rope = _table().to(dev)
    with torch.autocast(dev, dtype=ac_dtype):
        o = attnhub.attention(q, k, v, rope, backend=backend)
    assert o.dtype == ac_dtype
    with torch.autocast("cpu", dtype=ac_dtype):
        o_auto = attnhub.attention(q.cpu(), k.cpu(), v.cpu(), rope.to("cpu"))
        assert attnhub.explain(q.cpu(), k.cpu(), v.cpu(), rope.to("cpu")).chosen == "torch_sdpa"
    assert o_auto.dtype == ac_dtype
    ref = _reference(*(t.to(ac_dtype) for t in (q, k, v)), rope)  # what autocast feeds the backend
    assert_close_rel(o, ref, ac_dtype, f"{backend} under autocast {ac_dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_and_custom_scale(backend):
    """Against an independent float64 softmax(q k^T * scale) v; cross-attention N_kv != N."""
    q, k, v = _qkv(torch.float32, N=5, N_kv=9, D=16, device=device_for(backend))
    q64, k64, v64 = q.double(), k.double(), v.double()

    def manual(scale):
        return torch.softmax(q64 @ k64.transpose(-1, -2) * scale, dim=-1) @ v64

    o_default = attnhub.attention(q, k, v, backend=backend)
    assert_close_rel(o_default, manual(16**-0.5), torch.float32, f"{backend} default scale")
    o_custom = attnhub.attention(q, k, v, scale=0.9, backend=backend)
    assert_close_rel(o_custom, manual(0.9), torch.float32, f"{backend} scale=0.9")
    assert (o_custom - o_default).norm() > 1e-2 * o_default.norm()  # the scale matters at these inputs
    assert_close_rel(attnhub.attention(q, k, v, scale=1, backend=backend), manual(1.0), torch.float32, "int scale")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [-0.7, 0.0])
def test_negative_and_zero_scale(backend, scale):
    """softmax(q k^T * scale) v for a negative or zero scale, with a RoPE table, o and the gradients against float64.
    Scores spread over hundreds (q, k scaled by 3), so that exponents taken against anything but the row max of the
    scaled scores overflow (kernels that take the max before the scale must take the min for a negative one).
    N = 150: the Triton kernel's key tiles whole and a masked last one."""
    q, k, v = _qkv(torch.float32, N=150, D=16, device=device_for(backend))
    q, k = q * 3, k * 3
    rope = _table(grid=(1, 149)).to(q.device)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q.device)
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attnhub.attention(*refs, rope, scale=scale, backend="math")
    ref.backward(do.double())
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    o = attnhub.attention(*got, rope, scale=scale, backend=backend)
    o.backward(do)
    assert_close_rel(o, ref.detach(), torch.float32, f"{backend} scale={scale}")
    for name, t, r in zip("qkv", got, refs):
        if r.grad.norm() > 0:  # a zero scale gives dq = dk = 0
            assert_close_rel(t.grad, r.grad, torch.float32, f"{backend} scale={scale} d{name}", grad=True)
        else:
            assert t.grad.abs().max() < 1e-6, f"{backend} scale={scale} d{name}"
    if scale < 0:  # the scale's sign matters at these inputs
        o_pos = attnhub.attention(q, k, v, rope, scale=-scale, backend=backend)
        assert (o.detach() - o_pos).norm() > 1e-2 * o_pos.norm()


def test_fast_path_passes_the_scale_and_mask():
    """A repeated call (the fast path) hands the entry what the first call did: the default scale of its head dim,
    a given scale as a float, the mask."""
    seen: list = []

    def toy(q, k, v, rope, scale, key_padding_mask=None):
        seen.append((scale, type(scale), key_padding_mask))
        return q

    attnhub.register_backend("toy", toy, priority=1000, devices=["cpu"], key_padding=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    for kw in ({}, {"scale": 0.5}, {"scale": 2}, {"key_padding_mask": mask}):
        for D in (8, 16, 8):  # the default scale follows the head dim
            for _ in range(2):
                seen.clear()
                attnhub.attention(*_qkv(D=D), **kw)
                [(scale, kind, got_mask)] = seen
                assert (scale, kind) == (float(kw.get("scale", D**-0.5)), float), (kw, D)
                assert got_mask is kw.get("key_padding_mask"), (kw, D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("view", ["fused_qkv", "d_strided"])
def test_strided_inputs(backend, layout, view):
    B, N, H, D = 2, 7, 2, 16
    g = torch.Generator().manual_seed(1)
    dev = device_for(backend)
    if view == "fused_qkv":  # timm's qkv Linear output [B, N, 3, H, D] -> three [B, H, N, D] views
        q, k, v = torch.randn(B, N, 3, H, D, generator=g).to(dev).permute(2, 0, 3, 1, 4).unbind(0)
    else:  # the last dimension not contiguous
        q, k, v = (torch.randn(B, H, D, N, generator=g).to(dev).transpose(-1, -2) for _ in range(3))
    assert not q.is_contiguous() and not k.is_contiguous()
    rope = _table(D, (2, 3), 1, layout).to(q.device)
    o = attnhub.attention(q, k, v, rope, backend=backend)
    assert_close_rel(o, _reference(q.contiguous(), k.contiguous(), v.contiguous(), rope), torch.float32, backend)


# ----------------------------------------------------------------------------------------------- validation
def _per_head_table(H: int):
    t = _table()
    emb = torch.cat([t.sin.repeat_interleave(2, -1), t.cos.repeat_interleave(2, -1)], -1)
    return attnhub.CosSinTable.from_sin_cos(emb.expand(H, -1, -1).clone(), 1)


def _batched_table(B: int):
    t = _table()
    emb = torch.cat([t.sin.repeat_interleave(2, -1), t.cos.repeat_interleave(2, -1)], -1)
    return attnhub.CosSinTable.from_sin_cos(emb.expand(B, 1, -1, -1).clone(), 1)


def _bad(name):
    """Keyword arguments of one invalid call (q, k, v: [2, 2, 7, 16] float32 on CPU, a 2x3 table, 1 prefix)."""
    q, k, v = _qkv()
    rope = _table()
    cases = {
        "q_rank": dict(q=q[0]),
        "k_rank5": dict(k=k[None]),
        "q_not_tensor": dict(q=q.tolist()),
        "v_not_tensor": dict(v=None),
        "k_int": dict(k=k.to(torch.int32)),
        "q_complex": dict(q=q.to(torch.complex64)),
        "v_bool": dict(v=v > 0),
        "mixed_dtypes": dict(k=k.double()),
        "device_mismatch": dict(k=k.to("meta"), v=v.to("meta")),
        "B_mismatch": dict(k=k[:1], v=v[:1]),
        "H_not_multiple": dict(k=k[:, [0, 1, 0]], v=v[:, [0, 1, 0]]),
        "per_head_gqa": dict(k=k[:, :1], v=v[:, :1], rope=_per_head_table(2)),
        "batched_B": dict(rope=_batched_table(3)),
        "mask_not_tensor": dict(key_padding_mask=[[True] * 7] * 2),
        "mask_float": dict(key_padding_mask=torch.ones(2, 7)),
        "mask_shape": dict(key_padding_mask=torch.ones(2, 1, 7, dtype=torch.bool)),
        "mask_N": dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)),
        "mask_device": dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool, device="meta")),
        "D_mismatch": dict(k=k[..., :8], v=v[..., :8]),
        "kv_shape": dict(v=v[:, :, :5]),
        "seq_len_vs_table": dict(q=q[:, :, :6], k=k[:, :, :6], v=v[:, :, :6]),
        "k_seq_len_vs_table": dict(k=k[:, :, :6], v=v[:, :, :6]),
        "table_head_dim": dict(rope=_table(D=32)),
        "per_head_H": dict(rope=_per_head_table(3)),
        "table_device": dict(rope=rope.to("meta")),
        "zero_B": dict(q=q[:0], k=k[:0], v=v[:0], rope=None),
        "zero_N": dict(q=q[:, :, :0], rope=None),
        "zero_Nkv": dict(k=k[:, :, :0], v=v[:, :, :0], rope=None),
        "zero_D": dict(q=q[..., :0], k=k[..., :0], v=v[..., :0], rope=None),
        "scale_nan": dict(scale=float("nan")),
        "scale_inf": dict(scale=-math.inf),
        "scale_bool": dict(scale=True),
        "scale_str": dict(scale="0.5"),
        "scale_tensor": dict(scale=torch.tensor(0.5)),
        "backend_not_str": dict(backend=1),
        "rope_not_table": dict(rope=torch.zeros(6, 8)),
    }
    return {"q": q, "k": k, "v": v, "rope": rope, **cases[name]}


BAD = {  # case: (error type, pattern naming the argument)
    "q_rank": (ValueError, r"q must be 4-D \[B, H, N, D\], got shape \(2, 7, 16\)"),
    "k_rank5": (ValueError, r"k must be 4-D"),
    "q_not_tensor": (TypeError, r"q must be a torch.Tensor, got list"),
    "v_not_tensor": (TypeError, r"v must be a torch.Tensor, got NoneType"),
    "k_int": (TypeError, r"k must be a floating-point tensor, got dtype torch.int32"),
    "q_complex": (TypeError, r"q must be a floating-point tensor, got dtype torch.complex64"),
    "v_bool": (TypeError, r"v must be a floating-point tensor"),
    "mixed_dtypes": (TypeError, r"q, k, v must share one dtype, got torch.float32, torch.float64, torch.float32"),
    "device_mismatch": (ValueError, r"q, k, v must be on one device, got cpu, meta, meta"),
    "B_mismatch": (ValueError, r"must agree in B and D"),
    "D_mismatch": (ValueError, r"must agree in B and D"),
    "H_not_multiple": (ValueError, r"q has H = 2 heads and k/v have H_kv = 3: H must be a multiple of H_kv"),
    "per_head_gqa": (ValueError, r"per-head rope table cannot be used with grouped k/v heads \(H = 2, H_kv = 1\)"),
    "batched_B": (ValueError, r"per-sample rope table has B = 3 tables but q has B = 2"),
    "mask_not_tensor": (TypeError, r"key_padding_mask must be a bool tensor \[B, N_kv\] or None, got list"),
    "mask_float": (TypeError, r"key_padding_mask must be bool \[B, N_kv\] .* got dtype torch.float32"),
    "mask_shape": (ValueError, r"key_padding_mask must have shape \[B, N_kv\] = \(2, 7\), got \(2, 1, 7\)"),
    "mask_N": (ValueError, r"key_padding_mask must have shape \[B, N_kv\] = \(2, 7\), got \(2, 6\)"),
    "mask_device": (ValueError, r"key_padding_mask is on meta but q is on cpu"),
    "kv_shape": (ValueError, r"k and v must have the same shape"),
    "seq_len_vs_table": (ValueError, r"N = prefix_tokens \+ patches = 1 \+ 6 = 7, got N = 6 \(q\)"),
    "k_seq_len_vs_table": (ValueError, r"= 7, got N = 7 \(q\) and 6 \(k\)"),
    "table_head_dim": (ValueError, r"rope table has head_dim 32 but q has D = 16"),
    "per_head_H": (ValueError, r"per-head rope table has 3 heads but q has H = 2"),
    "table_device": (ValueError, r"rope table is on meta but q is on cpu"),
    "zero_B": (ValueError, r"every dimension must be > 0"),
    "zero_N": (ValueError, r"every dimension must be > 0"),
    "zero_Nkv": (ValueError, r"every dimension must be > 0"),
    "zero_D": (ValueError, r"every dimension must be > 0"),
    "scale_nan": (ValueError, r"scale must be a finite number"),
    "scale_inf": (ValueError, r"scale must be a finite number"),
    "scale_bool": (ValueError, r"scale must be a finite number"),
    "scale_str": (ValueError, r"scale must be a finite number"),
    "scale_tensor": (ValueError, r"scale must be a finite number"),
    "backend_not_str": (TypeError, r"backend must be a str or None, got int"),
    "rope_not_table": (TypeError, r"rope must be an attnhub.CosSinTable or None, got Tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_input_raises_typed_error_naming_the_argument(case):
    exc, pattern = BAD[case]
    good = _bad("backend_not_str") | {"backend": None}
    for _ in range(2):  # warm every cache with the valid call first: a cache hit must not skip validation
        attnhub.attention(**good)
    kw = _bad(case)
    with pytest.raises(exc, match=pattern):
        attnhub.attention(**kw)
    if "scale" not in kw or kw["scale"] is None:
        with pytest.raises(exc, match=pattern):
            attnhub.explain(**{n: a for n, a in kw.items() if n != "scale"})


# ---------------------------------------------------------------------------------- attnhub.list_backends()
def test_list_backends_lists_all_three_with_availability():
    infos = attnhub.list_backends()
    by_name = {i.name: i for i in infos}
    assert set(BACKENDS) <= set(by_name)
    assert [i.priority for i in infos] == sorted((i.priority for i in infos), reverse=True)
    for name in ("torch_sdpa", "math"):
        assert by_name[name].available and by_name[name].why_not == "" and by_name[name].description
    tri = by_name["triton_fa_rope"]
    if not HAS_CUDA:
        assert not tri.available and "device cpu: needs [cuda]" in tri.why_not, tri
        why = attnhub.explain(*_qkv()).reasons["triton_fa_rope"]
        assert tri.why_not in why, "list_backends gives the reasons selection gives"


# --------------------------------------------------------------------------------------------- attention_packed
def test_attention_packed_hands_qkv_only_to_backends_declaring_packed_qkv():
    """A backend with `packed_qkv: true` gets the keyword qkv (the tensor its q, k, v are views of), on the first
    call and through the fast path; another backend gets the views alone; both compute attention of the views."""
    seen: list = []
    ref = attnhub.REGISTRY.entry("math")

    def packed(q, k, v, rope, scale, qkv=None):
        seen.append(("packed", qkv))
        return ref(q, k, v, rope, scale)

    def plain(q, k, v, rope, scale):
        seen.append(("plain", None))
        return ref(q, k, v, rope, scale)

    attnhub.register_backend("toy_packed", packed, priority=-10, devices=["cpu"], packed_qkv=True)
    attnhub.register_backend("toy_plain", plain, priority=-11, devices=["cpu"])
    qkv = torch.randn(2, 7, 3, 2, 16, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    for backend in ("toy_packed", "toy_packed", "toy_plain"):
        o = attnhub.attention_packed(qkv, _table(), backend=backend)
        assert_close_rel(o, _reference(q, k, v, _table()), torch.float32, backend)
    assert [name for name, _ in seen] == ["packed", "packed", "plain"]
    assert seen[0][1] is qkv and seen[1][1] is qkv
    attnhub.attention(q, k, v, _table(), backend="toy_packed")  # a plain call: no qkv
    assert seen[-1] == ("packed", None)
