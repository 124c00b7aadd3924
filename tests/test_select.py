"""attnhub/select.py: the automatic choice on CPU, rejection reasons, forced-backend errors, the decision cache
(its key, its invalidation, its bound) and thread safety."""

from __future__ import annotations

import re

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import attnhub
from attnhub import select
from tests.helpers import assert_close_rel


def _qkv(dtype=torch.float32, B=1, H=2, N=7, D=16, seed=0, requires_grad=False):
    """q, k, v: [B, H, N, D], fresh random."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def _table(layout="interleaved", grid=(2, 3), D=16, prefix=1, heads=None, requires_grad=False):
    """A CosSinTable for N = prefix + gh*gw; per-head (cos: [heads, N_grid, D/2]) when `heads` is given."""
    t = attnhub.CosSinTable(grid=grid, head_dim=D, prefix_tokens=prefix, layout=layout)
    if heads is not None:
        widen = (lambda x: x.repeat_interleave(2, -1)) if layout == "interleaved" else (lambda x: torch.cat([x, x], -1))
        emb = torch.cat([widen(t.sin), widen(t.cos)], -1)  # timm's [N_grid, 2*D] = cat(sin, cos)
        t = attnhub.CosSinTable.from_sin_cos(emb.expand(heads, -1, -1).clone(), prefix, layout)
    if requires_grad:
        t.cos.requires_grad_(True)
    return t


# ------------------------------------------------------------------------------------------- automatic choice
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_picks_torch_sdpa_never_triton(dtype):
    q, k, v = _qkv(dtype)
    why = attnhub.explain(q, k, v, _table())
    assert why.chosen == "torch_sdpa" and why.how == "priority"
    assert why.reasons["torch_sdpa"] == [] and why.reasons["math"] == []
    assert why.reasons["triton_fa_rope"], "triton must not be chosen automatically on CPU"
    assert any("device cpu: needs [cuda]" in r for r in why.reasons["triton_fa_rope"])


def test_explanation_prints_the_choice_and_every_reason():
    why = attnhub.explain(*_qkv(torch.float64), _table())
    assert isinstance(why, attnhub.Explanation)
    r = why.reasons["triton_fa_rope"]
    assert "dtype float64 not in [float16, bfloat16, float32]" in r, r
    text = str(why)
    assert text.splitlines()[0] == "chosen: torch_sdpa (highest priority)"
    assert "triton_fa_rope: rejected:" in text and "dtype float64 not in" in text and "needs [cuda]" in text
    assert "math: eligible, not chosen" in text


def test_triton_forced_on_cpu_runs_only_through_the_interpreter(monkeypatch):
    q, k, v = _qkv()
    assert attnhub.explain(q, k, v, backend="triton_fa_rope").chosen == "triton_fa_rope"  # conftest: interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(attnhub.BackendUnavailableError, match="set TRITON_INTERPRET=1"):
        attnhub.explain(q, k, v, backend="triton_fa_rope")


def test_forced_backend_that_cannot_run_lists_reasons():
    q, k, v = _qkv(torch.float64, D=8)
    with pytest.raises(attnhub.BackendUnavailableError) as err:
        attnhub.attention(q, k, v, backend="triton_fa_rope")
    msg = str(err.value)
    assert "'triton_fa_rope' was forced but cannot run" in msg
    assert "dtype float64 not in" in msg and "head_dim 8 < 16" in msg
    assert "Eligible here: ['math', 'torch_sdpa']" in msg


def test_unknown_backend_lists_known_names():
    q, k, v = _qkv()
    for call in (lambda: attnhub.attention(q, k, v, backend="flash9"), lambda: attnhub.explain(q, k, v, backend="flash9")):
        with pytest.raises(attnhub.UnknownBackendError, match=r"'flash9'.*known: " + re.escape(str(sorted(select.REGISTRY.specs())))):
            call()
    assert issubclass(attnhub.UnknownBackendError, ValueError)


def test_no_backend_can_run(monkeypatch):
    """Every backend rejected: a BackendUnavailableError that carries the whole explanation."""
    q, k, v = _qkv()
    specs = attnhub.REGISTRY.specs()
    attnhub.REGISTRY.restore({n: s for n, s in specs.items() if n == "triton_fa_rope"})
    with pytest.raises(attnhub.BackendUnavailableError, match="no attnhub backend can run this call") as err:
        attnhub.attention(q, k, v)
    assert "triton_fa_rope: rejected: device cpu" in str(err.value)


# -------------------------------------------------------------------------------------------- decision cache
def _toy(calls: list):
    """A backend entry that records that it ran and returns the math result."""
    ref = attnhub.REGISTRY.entry("math")

    def toy(q, k, v, rope, scale, **kwargs):  # kwargs: key_padding_mask, for a toy declaring key_padding
        calls.append(q.dtype)
        return ref(q, k, v, rope, scale, **kwargs)

    return toy


# constraint on a toy backend (priority above every built-in), a call it accepts, one it must reject
CASES = {
    "dtype": (dict(dtypes=["float16"]), dict(dtype=torch.float16), dict(dtype=torch.float32)),
    "seq_len": (dict(max_seq_len=7), dict(N=7), dict(N=8)),
    "head_dim": (dict(head_dim={"max": 16}), dict(D=16), dict(D=32)),
    "layout": (dict(rope_layouts=["half"]), dict(layout="half"), dict(layout="interleaved")),
    "rope_none": (dict(rope_layouts=["none"]), dict(layout=None), dict(layout="interleaved")),
    "per_head": (dict(rope_per_head=False), dict(heads=None), dict(heads=2)),
    "rope_grad": (dict(rope_grad=False), dict(rope_grad=False), dict(rope_grad=True)),
    "grad": (dict(backward=False), dict(grad=False), dict(grad=True)),
    "cross": (dict(cross_attention=False, rope_layouts=["none"]), dict(layout=None), dict(layout=None, n_kv=9)),
    "key_padding": (dict(key_padding=False), dict(mask=False), dict(mask=True)),
    "gqa": (dict(gqa=False), dict(kv_heads=2), dict(kv_heads=1)),
    "rope_batched": (dict(rope_batched=False), dict(batched=False), dict(batched=True)),
    "rope_coords": (dict(rope_coords=False), dict(coords=False), dict(coords=True)),
}


def _run(dtype=torch.float32, N=7, D=16, layout="interleaved", heads=None, rope_grad=False, grad=False,
         n_kv=None, backend=None, mask=False, kv_heads=2, batched=False, coords=False):
    """One attention call with these facts (B=1, H=2); returns the output."""
    q, k, v = _qkv(dtype, N=N, D=D, requires_grad=grad)
    if n_kv is not None:
        k, v = _qkv(dtype, N=n_kv, D=D, seed=1)[:2]
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    rope = None
    if layout is not None:
        grid = (2, (N - 1) // 2) if N % 2 else (1, N - 1)
        rope = _table(layout, grid=grid, D=D, heads=heads, requires_grad=rope_grad)
        if batched:  # the same table as one per sample: [1, 1, N_grid, D/2]
            emb = torch.cat([rope.sin, rope.sin, rope.cos, rope.cos], -1)  # half layout: pairs (j, j + D/2)
            rope = attnhub.CosSinTable.from_sin_cos(emb[None, None], rope.prefix_tokens, "half")
        if coords:
            yx = torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij"), -1)
            rope = attnhub.CosSinTable.from_coords(yx.reshape(-1, 2), attnhub.rope.axial_freqs(D), prefix_tokens=1)
    key_padding_mask = None
    if mask:
        key_padding_mask = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool)
        key_padding_mask[:, -1] = False
    return attnhub.attention(q, k, v, rope, backend=backend, key_padding_mask=key_padding_mask)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("order", ["accepted_first", "rejected_first"])
def test_cache_key_separates_calls_that_differ_in_one_fact(case, order):
    constraint, accepted, rejected = CASES[case]
    calls = []
    attnhub.register_backend("toy", _toy(calls), priority=1000, devices=["cpu"], **constraint)
    seq = [(accepted, True), (rejected, False)]
    for kwargs, expect in (seq if order == "accepted_first" else seq[::-1]) * 2:  # twice: the second is cached
        before = len(calls)
        _run(**kwargs)
        assert (len(calls) > before) == expect, (case, kwargs)


def test_forced_backend_is_part_of_the_key():
    calls = []
    attnhub.register_backend("toy", _toy(calls), priority=1000, devices=["cpu"])
    _run()
    _run(backend="math")
    _run()
    assert len(calls) == 2
    o_math, o_auto = _run(backend="math"), _run()
    assert len(calls) == 3 and torch.equal(o_math, o_auto)


def test_registration_invalidates_cached_decisions():
    """A call cached before a registration is re-decided after it (the registry version is in the key)."""
    q, k, v = _qkv(torch.float16)
    q32, k32, v32 = _qkv(torch.float32)
    for _ in range(2):
        attnhub.attention(q, k, v)
        attnhub.attention(q32, k32, v32)
    assert attnhub.explain(q, k, v).chosen == "torch_sdpa"
    calls = []
    attnhub.register_backend("toy", _toy(calls), priority=1000, devices=["cpu"], dtypes=["float16"])
    attnhub.attention(q32, k32, v32)
    assert calls == []
    attnhub.attention(q, k, v)
    assert calls == [torch.float16]
    assert attnhub.explain(q, k, v).chosen == "toy" and attnhub.explain(q32, k32, v32).chosen == "torch_sdpa"
    # and restoring the registry (as conftest does) drops the toy again
    attnhub.REGISTRY.restore({n: s for n, s in attnhub.REGISTRY.specs().items() if n != "toy"})
    attnhub.attention(q, k, v)
    assert calls == [torch.float16]


@pytest.mark.parametrize("static", [False, True], ids=["eager", "compiled"])
def test_call_from_inputs(static):
    """The one constructor of the key; a compiled graph's key leaves out batch and heads (a dynamic batch)."""
    q, k, v = _qkv(B=3, N=7, D=16, requires_grad=True)
    table = _table("half", heads=2, requires_grad=True)
    control = ("math", "forced by attnhub.use_backend", (("torch_sdpa", "ATTNHUB_DISABLE"),))
    call = select.Call.from_inputs(q, k, v, table, control, static=static)
    B, H = (0, 0) if static else (3, 2)
    version = 0 if static else select.REGISTRY.version
    assert call == select.Call("cpu", None, torch.float32, B, H, 7, 7, 16, "half", True, True, True,
                               False, False, False, False, *control, version)
    with torch.no_grad():
        call = select.Call.from_inputs(q, k, v, None)
    assert (call.rope_layout, call.rope_per_head, call.rope_grad, call.needs_grad) == ("none", False, False, False)
    # issue 12's facts: a mask, grouped k/v heads, a per-sample table from coordinates
    yx = torch.zeros(3, 6, 2)
    coords = attnhub.CosSinTable.from_coords(yx, attnhub.rope.axial_freqs(16), prefix_tokens=1)
    mask = torch.ones(3, 7, dtype=torch.bool)
    call = select.Call.from_inputs(q, k[:, :1], v[:, :1], coords, None, mask, static=static)
    assert (call.key_padding, call.gqa, call.rope_batched, call.rope_coords) == (True, True, True, True)
    assert call.facts()["gqa"] is True and "gqa" not in select.Call.from_inputs(q, k, v, None, None).facts()


def test_cache_key_fields():
    """The fields of the decision key: a new constraint in the registry vocabulary needs its fact here."""
    assert set(select.Call._fields) >= {
        "device_type", "device_index", "dtype", "batch", "heads", "n_q", "n_kv", "head_dim", "rope_layout",
        "rope_per_head", "rope_grad", "needs_grad", "key_padding", "gqa", "rope_batched", "rope_coords", "forced",
        "forced_by", "disabled", "registry_version",
    }


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(select, "CACHE_SIZE", 4)
    select.clear_cache()
    for B in range(1, 11):
        q, k, v = _qkv(B=B, N=3, D=8)
        attnhub.attention(q, k, v)
        assert len(select._cache) <= 4 and len(select.FAST) <= 4
    assert len(select._cache) >= 1


# ------------------------------------------------------------------------------------------------- threads
def test_threads_mixed_calls_and_forced_backends():
    """8 threads, a few hundred mixed attention/explain calls, each under its own use_backend context."""
    ran = threading.local()

    def recorder(name):
        ref = attnhub.REGISTRY.entry("math")

        def fn(q, k, v, rope, scale):
            ran.name = name
            return ref(q, k, v, rope, scale)

        return fn

    for name, prio in (("toy_a", -10), ("toy_b", -20)):
        attnhub.register_backend(name, recorder(name), priority=prio, devices=["cpu"])
    inputs = {}
    for dtype in (torch.float32, torch.float64):
        q, k, v = _qkv(dtype, N=7, D=16, seed=3)
        t = _table()
        ref = attnhub.attention(*(x.double() for x in (q, k, v)), t, backend="math")
        inputs[dtype] = (q, k, v, t, ref)

    def task(i):
        rnd = random.Random(i)
        dtype = rnd.choice([torch.float32, torch.float64])
        ctx = rnd.choice([None, "toy_a", "toy_b", "math"])
        per_call = rnd.choice([None, None, "toy_b"])
        expected = per_call or ctx or "torch_sdpa"
        q, k, v, t, ref = inputs[dtype]
        with attnhub.use_backend(ctx):
            if rnd.random() < 0.3:
                assert attnhub.explain(q, k, v, t, backend=per_call).chosen == expected
                return expected
            ran.name = None
            o = attnhub.attention(q, k, v, t, backend=per_call)
        assert o.dtype == dtype
        assert_close_rel(o, ref, dtype, f"task {i}")
        assert ran.name == (expected if expected.startswith("toy") else None), (i, ran.name, expected)
        return expected

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(task, range(400)))
    assert set(results) == {"torch_sdpa", "toy_a", "toy_b", "math"}


def test_issue12_arguments_are_reasons_in_explain_and_forced_errors():
    """A mask, grouped k/v heads, a per-sample table, a coordinate table: each a reason of its own for a backend
    that declares them false (every built-in declares them true: a toy registered without the fields), in `explain`
    and in the error of a forced backend."""
    q, k, v = _qkv(B=2, H=4)
    k, v = k[:, :2], v[:, :2]
    mask = torch.ones(2, 7, dtype=torch.bool)
    yx = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1).reshape(1, 6, 2)
    table = attnhub.CosSinTable.from_coords(yx.expand(2, -1, -1), attnhub.rope.axial_freqs(16), prefix_tokens=1)
    attnhub.register_backend("toy", _toy([]), priority=1000, devices=["cpu"])
    why = attnhub.explain(q, k, v, table, key_padding_mask=mask)
    assert why.chosen == "torch_sdpa" and why.reasons["math"] == []
    expected = ["per-sample RoPE tables ([B, 1|H, N_grid, D/2]) not supported",
                "RoPE tables from coordinates (CosSinTable.from_coords) not supported",
                "no key_padding_mask support", "grouped k/v heads (H_kv < H) not supported"]
    assert all(r in why.reasons["toy"] for r in expected), why.reasons["toy"]
    with pytest.raises(attnhub.BackendUnavailableError, match=r"forced but cannot run.*no key_padding_mask support"):
        attnhub.attention(q, k, v, table, backend="toy", key_padding_mask=mask)


# ------------------------------------------------------------------------------------------------- fallback
class Flaky:
    """A backend entry that raises `error(message)` on the calls numbered in `fail` (1-based, or "all"), else
    runs torch_sdpa."""

    def __init__(self, fail=(1,), error=RuntimeError, message="kernel compilation failed"):
        self.calls, self.fail, self.error, self.message = 0, fail, error, message

    def __call__(self, q, k, v, rope, scale):
        self.calls += 1
        if self.fail == "all" or self.calls in self.fail:
            raise self.error(self.message)
        return attnhub.REGISTRY.entry("torch_sdpa")(q, k, v, rope, scale)


def _flaky(name="flaky", **kw) -> Flaky:
    fn = Flaky(**kw)
    attnhub.register_backend(name, fn, priority=200, devices=["cpu"])
    return fn


def test_backend_failing_at_its_first_run_falls_back(caplog):
    flaky = _flaky()
    q, k, v = _qkv(requires_grad=True)
    with caplog.at_level("WARNING", logger="attnhub.select"):
        o = attnhub.attention(q, k, v)
        again = attnhub.attention(q, k, v)
    assert torch.equal(o, attnhub.attention(q, k, v, backend="torch_sdpa")) and torch.equal(again, o)
    assert flaky.calls == 1  # marked failed for this key: never tried again
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "'flaky' failed at its first run" in record.getMessage()
    assert "Call(device_type='cpu'" in record.getMessage()
    assert "RuntimeError: kernel compilation failed" in record.getMessage()
    why = attnhub.explain(q, k, v)
    assert why.chosen == "torch_sdpa" and why.fell_back_from == ("flaky",)
    assert "chosen: torch_sdpa (highest priority; fallback: flaky failed at run time)" in str(why)
    assert "flaky: rejected: failed at its first run for this call" in str(why)
    attnhub.attention(*_qkv(N=9))  # another key: the backend gets its own first run
    assert flaky.calls == 2


def test_fallback_inside_a_training_step_equals_the_next_backend_forced():
    """The forward of the first step fails on `flaky`: the step runs on torch_sdpa, bitwise as when forced."""

    def step(**kw):
        torch.manual_seed(0)
        proj = torch.nn.Linear(16, 3 * 16)
        x = torch.randn(2, 7, 16)
        q, k, v = proj(x).reshape(2, 7, 3, 1, 16).permute(2, 0, 3, 1, 4)
        attnhub.attention(q, k, v, **kw).square().mean().backward()
        return proj.weight.grad

    flaky = _flaky()
    assert torch.equal(step(), step(backend="torch_sdpa")) and flaky.calls == 1


@pytest.mark.parametrize("how", ["backend", "pin"])
def test_forced_or_pinned_backend_failure_propagates(how):
    flaky = _flaky()
    q, k, v = _qkv()

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return attnhub.attention(q, k, v)

    with pytest.raises(RuntimeError, match="kernel compilation failed"):
        if how == "backend":
            attnhub.attention(q, k, v, backend="flaky")
        else:
            attnhub.pin_backend(Attn(), "flaky")(q, k, v)
    assert flaky.calls == 1 and attnhub.explain(q, k, v).chosen == "flaky"  # not marked


def test_out_of_memory_propagates_and_marks_nothing():
    flaky = _flaky(error=torch.OutOfMemoryError, message="CUDA out of memory")
    q, k, v = _qkv()
    with pytest.raises(torch.OutOfMemoryError):
        attnhub.attention(q, k, v)
    attnhub.attention(q, k, v)  # the next call tries the backend again, and it runs
    assert flaky.calls == 2 and attnhub.explain(q, k, v).chosen == "flaky"


def test_failure_after_a_successful_run_propagates():
    flaky = _flaky(fail=(2,))
    q, k, v = _qkv()
    attnhub.attention(q, k, v)
    with pytest.raises(RuntimeError, match="kernel compilation failed"):
        attnhub.attention(q, k, v)


def test_every_backend_failing_raises_with_their_errors():
    _flaky("flaky", fail="all")
    _flaky("flaky2", fail="all", error=ValueError, message="launch failed")
    q, k, v = _qkv()
    with attnhub.disable_backends("torch_sdpa", "math"):
        with pytest.raises(attnhub.BackendUnavailableError, match="no attnhub backend can run this call") as err:
            attnhub.attention(q, k, v)
    assert isinstance(err.value.__cause__, ValueError)  # the last failure
    assert "ValueError: launch failed" in str(err.value) and "RuntimeError: kernel compilation failed" in str(err.value)


@torch.library.custom_op("attnhub_tests::failing_kernel", mutates_args=())
def _failing_kernel(q: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("kernel compilation failed")  # as a Triton kernel that fails at its first launch


@_failing_kernel.register_fake
def _(q):
    return torch.empty_like(q)


@pytest.mark.parametrize("where", ["trace_fullgraph", "trace", "graph_run"])
def test_under_torch_compile(where):
    """Documented in api._compiled_attention: a compiled graph has no fallback. A backend that raises while traced
    fails the compilation under fullgraph=True (torch._dynamo.exc.Unsupported); without fullgraph Dynamo runs that
    `attention` call eagerly, where the fallback applies; an error when the graph runs (a custom op's kernel)
    propagates. Disabling the backend and compiling again runs the next one."""
    if where == "graph_run":
        attnhub.register_backend("flaky", lambda q, k, v, rope, scale: _failing_kernel(q), priority=200,
                                 devices=["cpu"])
    else:
        flaky = _flaky(fail="all")
    q, k, v = _qkv()
    torch._dynamo.reset()  # the graphs of another case of this test: the choice is fixed in them, unguarded
    fn = torch.compile(lambda q, k, v: attnhub.attention(q, k, v), backend="aot_eager",
                       fullgraph=where != "trace")
    expected = attnhub.attention(q, k, v, backend="torch_sdpa")
    if where == "trace":
        assert torch.equal(fn(q, k, v), expected)
        assert attnhub.explain(q, k, v).fell_back_from == ("flaky",) and flaky.calls == 1
    else:
        error = torch._dynamo.exc.Unsupported if where == "trace_fullgraph" else RuntimeError
        with pytest.raises(error, match="kernel compilation failed" if where == "graph_run" else "Observed exception"):
            fn(q, k, v)
    torch._dynamo.reset()
    with attnhub.disable_backends("flaky"):
        assert torch.equal(fn(q, k, v), expected)
