"""attnhub/control.py: module pins (precedence, nesting, the fast path, torch.compile), the deny-list
(ATTNHUB_DISABLE, `disable_backends`), and the errors of bad input.

Toy backends (low priority, CPU) record their name when they run, so each test sees which backend ran.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn

import attnhub
from attnhub import settings

TOYS = ("toy_a", "toy_b", "toy_c")


def _qkv(dtype=torch.float32, B=2, H=2, N=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3))


@pytest.fixture
def ran():
    """Registers TOYS (CPU, float32 only, below torch_sdpa); returns the list of names in the order they ran."""
    calls: list[str] = []
    math = attnhub.REGISTRY.entry("math")
    for i, name in enumerate(TOYS):
        def fn(q, k, v, rope, scale, _name=name):
            calls.append(_name)
            return math(q, k, v, rope, scale)
        attnhub.register_backend(name, fn, priority=-10 - i, devices=["cpu"], dtypes=["float32"])
    return calls


class Attn(nn.Module):
    """Calls `attnhub.attention` on its inputs, and around it any child modules (to nest pins)."""

    def __init__(self, *children: nn.Module):
        super().__init__()
        self.children_ = nn.ModuleList(children)

    def forward(self, q, k, v):
        o = attnhub.attention(q, k, v)
        for child in self.children_:
            o = o + child(q, k, v)
        return o


def _which(module, calls, *args) -> str:
    """The backend `module`'s own attention call ran (torch_sdpa when no toy recorded)."""
    before = len(calls)
    module(*args)
    return calls[before] if len(calls) > before else "torch_sdpa"


# ------------------------------------------------------------------------------------------------ pins
def test_precedence_call_over_pin_over_context_over_env(ran, monkeypatch):
    q, k, v = _qkv()

    class PerCall(nn.Module):
        def forward(self, q, k, v):
            return attnhub.attention(q, k, v, backend="toy_c")

    plain, pinned_mod, per_call = Attn(), attnhub.pin_backend(Attn(), "toy_a"), attnhub.pin_backend(PerCall(), "toy_a")
    monkeypatch.setenv("ATTNHUB_BACKEND", "toy_c")
    assert _which(plain, ran, q, k, v) == "toy_c"
    with attnhub.use_backend("toy_b"):
        assert _which(plain, ran, q, k, v) == "toy_b"
        assert _which(pinned_mod, ran, q, k, v) == "toy_a"  # the pin wins over the context and the variable
        assert _which(per_call, ran, q, k, v) == "toy_c"  # the per-call argument wins over the pin
    monkeypatch.delenv("ATTNHUB_BACKEND")
    assert _which(plain, ran, q, k, v) == "torch_sdpa"
    assert _which(pinned_mod, ran, q, k, v) == "toy_a"


def test_innermost_pin_wins_and_the_stack_unwinds(ran):
    q, k, v = _qkv()
    inner, free = attnhub.pin_backend(Attn(), "toy_b"), Attn()
    outer = attnhub.pin_backend(Attn(inner, free), "toy_a")
    outer(q, k, v)
    assert ran == ["toy_a", "toy_b", "toy_a"]  # outer's own call, inner's, then free inherits outer's pin
    ran.clear()
    free(q, k, v)  # called alone: no pin left on the stack
    assert ran == []
    assert attnhub.pinned(outer) == {"": "toy_a", "children_.0": "toy_b"}


def test_pin_stack_is_popped_when_forward_raises(ran):
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="boom"):
        attnhub.pin_backend(Boom(), "toy_a")(q)
    assert _which(Attn(), ran, q, k, v) == "torch_sdpa"


def test_unpin_removes_the_hooks(ran):
    q, k, v = _qkv()
    m = attnhub.pin_backend(Attn(), "toy_a")
    attnhub.pin_backend(m, "toy_b")  # re-pinning replaces the name, keeps one pair of hooks
    assert len(m._forward_pre_hooks) == 1 and _which(m, ran, q, k, v) == "toy_b"
    attnhub.pin_backend(m, None)
    assert not m._forward_pre_hooks and not m._forward_hooks and attnhub.pinned(m) == {}
    assert _which(m, ran, q, k, v) == "torch_sdpa"


def test_fast_path_keys_on_the_pin(ran):
    """Same shapes, alternating pinned and unpinned modules: every call runs its own backend (no stale hit)."""
    q, k, v = _qkv()
    a, b, free = attnhub.pin_backend(Attn(), "toy_a"), attnhub.pin_backend(Attn(), "toy_b"), Attn()
    for _ in range(3):
        assert [_which(m, ran, q, k, v) for m in (a, free, b)] == ["toy_a", "torch_sdpa", "toy_b"]


def test_fast_path_keys_on_every_control(ran, monkeypatch):
    """Same inputs, each way of forcing or ruling out a backend in turn, twice over: every call runs what `explain`
    chooses there (a cached call never outlives a change of a pin, `use_backend`, `disable_backends`, the
    variables, `settings.override` or the registry)."""
    q, k, v = _qkv()
    pinned_mod = attnhub.pin_backend(Attn(), "toy_c")

    @contextlib.contextmanager
    def env(name, value):
        monkeypatch.setenv(name, value)
        yield
        monkeypatch.delenv(name)

    def toy_top(q, k, v, rope, scale):
        ran.append("toy_top")
        return q

    @contextlib.contextmanager
    def registered():
        snapshot = attnhub.REGISTRY.snapshot()
        attnhub.register_backend("toy_top", toy_top, priority=1000, devices=["cpu"])
        yield
        attnhub.REGISTRY.restore(snapshot)

    cases = [
        (contextlib.nullcontext, "torch_sdpa"),
        (lambda: attnhub.use_backend("toy_a"), "toy_a"),
        (lambda: env("ATTNHUB_BACKEND", "toy_b"), "toy_b"),
        (lambda: settings.override(backend="toy_a"), "toy_a"),
        (lambda: env("ATTNHUB_DISABLE", "torch_sdpa,math"), "toy_a"),
        (lambda: settings.override(disable=("torch_sdpa", "math", "toy_a")), "toy_b"),
        (lambda: attnhub.disable_backends("torch_sdpa", "math"), "toy_a"),
        (registered, "toy_top"),
        (contextlib.nullcontext, "torch_sdpa"),
    ]
    for _ in range(2):
        for make, expected in cases:
            with make():
                for _ in range(2):  # the second call takes the fast path
                    assert _which(Attn(), ran, q, k, v) == expected == attnhub.explain(q, k, v).chosen
                    assert _which(pinned_mod, ran, q, k, v) == "toy_c"


def test_explain_reports_the_pin():
    q, k, v = _qkv()
    seen = []

    class Explaining(nn.Module):
        def forward(self, q, k, v):
            seen.append(attnhub.explain(q, k, v))
            return attnhub.attention(q, k, v)

    attnhub.pin_backend(Explaining(), "math")(q, k, v)
    assert seen[0].chosen == "math" and seen[0].how == "pinned"
    assert "chosen: math (pinned on Explaining)" in str(seen[0])


def test_pinned_backend_that_cannot_run_names_the_module(ran):
    q, k, v = _qkv(torch.float64)  # the toys take float32 only
    m = attnhub.pin_backend(Attn(), "toy_a")
    with pytest.raises(attnhub.BackendUnavailableError, match=r"'toy_a' is pinned on Attn but cannot run this call: "
                                                              r"dtype float64 not in \[float32\]"):
        m(q, k, v)


def test_pin_survives_torch_compile_fullgraph(ran):
    """Dynamo traces the pin hooks: the compiled model runs the pinned backend, and a new pin recompiles (Dynamo
    guards on the module's pin)."""
    q, k, v = _qkv()
    inner = attnhub.pin_backend(Attn(), "toy_a")
    model = Attn(inner)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=0, atol=0)
        ran.clear()
        compiled(q, k, v)
        assert ran == ["toy_a"]  # the outer call is automatic (torch_sdpa), the inner one pinned
        attnhub.pin_backend(inner, "toy_b")
        compiled(q, k, v)
        assert ran[-1] == "toy_b"


# ------------------------------------------------------------------------------------------------ deny-list
def test_disabled_backends_are_skipped_and_explained(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("ATTNHUB_DISABLE", "torch_sdpa")
    why = attnhub.explain(q, k, v)
    assert why.chosen == "math" and why.reasons["torch_sdpa"] == ["disabled by ATTNHUB_DISABLE"]
    assert "torch_sdpa: rejected: disabled by ATTNHUB_DISABLE" in str(why)
    monkeypatch.delenv("ATTNHUB_DISABLE")
    with attnhub.disable_backends("torch_sdpa"):
        assert attnhub.explain(q, k, v).reasons["torch_sdpa"] == ["disabled by attnhub.disable_backends"]
        torch.testing.assert_close(attnhub.attention(q, k, v), attnhub.attention(q, k, v, backend="math"), rtol=0,
                                   atol=0)
    assert attnhub.explain(q, k, v).chosen == "torch_sdpa"


def test_disable_contexts_nest_and_add_to_the_variable(monkeypatch, ran):
    q, k, v = _qkv()
    monkeypatch.setenv("ATTNHUB_DISABLE", "torch_sdpa")
    with attnhub.disable_backends("math"):
        with attnhub.disable_backends("toy_a"):
            assert attnhub.explain(q, k, v).chosen == "toy_b"
        assert attnhub.explain(q, k, v).chosen == "toy_a"


@pytest.mark.parametrize("how", ["backend", "use_backend", "pin"])
@pytest.mark.parametrize("by", ["ATTNHUB_DISABLE", "attnhub.disable_backends"])
def test_forcing_or_pinning_a_disabled_backend_names_the_variable(how, by, monkeypatch):
    q, k, v = _qkv()
    if by == "ATTNHUB_DISABLE":
        monkeypatch.setenv("ATTNHUB_DISABLE", "math")
    with attnhub.disable_backends(*(["math"] if by != "ATTNHUB_DISABLE" else [])):
        with pytest.raises(attnhub.BackendUnavailableError, match=f"but is disabled by {by}"):
            if how == "backend":
                attnhub.attention(q, k, v, backend="math")
            elif how == "use_backend":
                with attnhub.use_backend("math"):
                    attnhub.attention(q, k, v)
            else:
                attnhub.pin_backend(Attn(), "math")(q, k, v)


def test_disabling_every_eligible_backend_says_so():
    q, k, v = _qkv(torch.float64)
    with attnhub.disable_backends("torch_sdpa", "math"):
        with pytest.raises(attnhub.BackendUnavailableError, match="every attnhub backend that can run this call is "
                                                                  "disabled: math .by attnhub.disable_backends."):
            attnhub.attention(q, k, v)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("value,error,match", [
    ("nonesuch", attnhub.UnknownBackendError, r"ATTNHUB_DISABLE: unknown attnhub backend 'nonesuch'"),
    ("math,,torch_sdpa", ValueError, r"ATTNHUB_DISABLE='math,,torch_sdpa': an empty backend name"),
    (" , ", ValueError, r"ATTNHUB_DISABLE=' , ': an empty backend name"),
])
def test_bad_disable_variable_names_the_variable(value, error, match, monkeypatch):
    monkeypatch.setenv("ATTNHUB_DISABLE", value)
    with pytest.raises(error, match=match):
        attnhub.attention(*_qkv())


@pytest.mark.parametrize("call,error,match", [
    (lambda: attnhub.pin_backend(object(), "math"), TypeError, "pin_backend: module must be a torch.nn.Module"),
    (lambda: attnhub.pin_backend(nn.Linear(2, 2), 3), TypeError, "pin_backend: name must be a backend name"),
    (lambda: attnhub.pin_backend(nn.Linear(2, 2), "nonesuch"), attnhub.UnknownBackendError,
     r"pin_backend: unknown attnhub backend\(s\) \['nonesuch'\]"),
    (lambda: attnhub.pinned("model"), TypeError, "pinned: model must be a torch.nn.Module"),
    (lambda: attnhub.disable_backends("nonesuch").__enter__(), attnhub.UnknownBackendError,
     r"disable_backends: unknown attnhub backend\(s\) \['nonesuch'\]"),
    (lambda: attnhub.disable_backends(["math"]).__enter__(), TypeError, "disable_backends: names must be"),
])
def test_bad_input_raises_typed_errors_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_failed_pin_leaves_the_module_unchanged():
    m = attnhub.pin_backend(nn.Linear(2, 2), "math")
    with pytest.raises(attnhub.UnknownBackendError):
        attnhub.pin_backend(m, "nonesuch")
    assert attnhub.pinned(m) == {"": "math"}


def test_list_backends_reports_disabled_ones(monkeypatch):
    monkeypatch.setenv("ATTNHUB_DISABLE", "math")
    info = {b.name: b for b in attnhub.list_backends()}
    assert not info["math"].available and info["math"].why_not == "disabled by ATTNHUB_DISABLE"
    assert info["torch_sdpa"].available
