"""The Triton backends' runtime (`backends/_triton_runtime.py`), through triton_fa_rope: compiled runners kept per
launch, and compiling a training call's kernels ahead (planned through the launcher, checked against what the call
then launches)."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
import triton.runtime

import attnhub
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import autograd, configs, launch
from tests.backends.triton_fa_rope.test_launch import _case


class _FakeParam:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _FakeKernel:
    """Stands in for a Triton JITFunction `f(X, n, s, A: constexpr, B: constexpr)`: `kernel[grid](...)` records the
    call and returns a compiled kernel whose runner (`compiled[grid](*args)`) records its arguments."""

    params = [_FakeParam("X", False), _FakeParam("n", False), _FakeParam("s", False), _FakeParam("A", True),
              _FakeParam("B", True)]

    def __init__(self):
        self.jit_calls, self.runner_calls = [], []
        kernel = self

        class Compiled:
            def __getitem__(self, grid):
                return lambda *args: kernel.runner_calls.append((grid, args))

        self.compiled = Compiled()

    def __getitem__(self, grid):
        def run(*args, num_warps, num_stages, **constexprs):
            self.jit_calls.append((grid, args, num_warps, num_stages, constexprs))
            return self.compiled

        return run


def test_launcher_keeps_compiled_kernels_per_specialization():
    """`launch` compiles through `kernel[grid]` once per set of facts Triton specializes on, then calls the
    compiled kernel with the run-time arguments and the constexprs in signature order."""
    kernel = _FakeKernel()
    x = torch.zeros(64)

    def run(t, n=7, s=0.5, B=2):
        runtime.launch(kernel, (3,), (t, n, s), 4, 2, B=B, A=1)  # constexprs passed out of signature order

    with runtime.fresh_caches(keep_runners=True) as state:
        run(x)
        assert len(kernel.jit_calls) == 1 and not kernel.runner_calls
        run(x)
        assert len(kernel.jit_calls) == 1
        assert kernel.runner_calls == [((3, 1, 1), (x, 7, 0.5, 1, 2))]  # A, B appended in signature order
        run(torch.nn.Parameter(x.clone()))  # another tensor (a subclass, too) of the same facts: no new entry
        assert len(kernel.jit_calls) == 1 and len(state.runners) == 1 and len(kernel.runner_calls) == 2
        kernel.runner_calls.pop()
        # every fact Triton specializes on makes a new entry: alignment, dtype, scalar value and type, constexpr
        for i, variant in enumerate([x[1:], x.half(), dict(n=16), dict(n=7.0), dict(s=7.5), dict(B=3)], start=2):
            run(variant) if isinstance(variant, torch.Tensor) else run(x, **variant)
            assert len(kernel.jit_calls) == i and len(state.runners) == i
        assert len(kernel.runner_calls) == 1


def test_keyed_launches_find_their_runner_by_the_callers_key():
    """`launch_keyed`: one compile per caller key (whatever the arguments), kept apart from `launch`'s own keys, and
    seen by the recorder like any launch."""
    kernel = _FakeKernel()
    x = torch.zeros(64)
    with runtime.fresh_caches(keep_runners=True) as state, runtime.recording() as launches:
        runtime.launch_keyed("plan-a", kernel, (3,), (x, 7, 0.5), 4, 2, A=1, B=2)
        runtime.launch_keyed("plan-a", kernel, (3,), (x.clone(), 7, 0.5), 4, 2, A=1, B=2)
        assert len(kernel.jit_calls) == 1 and len(kernel.runner_calls) == 1
        runtime.launch(kernel, (3,), (x, 7, 0.5), 4, 2, A=1, B=2)  # the same arguments, unkeyed: its own entry
        runtime.launch_keyed("plan-b", kernel, (3,), (x, 7, 0.5), 4, 2, A=1, B=2)
        assert len(kernel.jit_calls) == 3 and len(state.runners) == 3
    assert [r.args[1] for r in launches] == [7, 7, 7, 7]


def test_kept_runners_launch_through_the_driver_where_it_built_one(monkeypatch):
    """On CUDA a kept runner gets a driver launch at its first call (`_driver_launch.runner`) unless
    ATTNHUB_TRITON_LAUNCHER=triton; later calls launch through it, and through Triton's runner when it declines."""
    from attnhub import settings
    from attnhub.backends import _driver_launch

    kernel, built, driven = _FakeKernel(), [], []
    answer = [True]

    def runner(compiled, args, tail):
        built.append(tail)
        return lambda args, grid, stream: driven.append((args, grid, stream)) or answer[0]

    class Run:  # the compiled kernel's launcher as `launch_keyed` calls it on CUDA
        def __call__(self, *args):
            kernel.runner_calls.append(args[:4])

    kernel.compiled.run, kernel.compiled.function, kernel.compiled.packed_metadata = Run(), 0, None
    monkeypatch.setattr(_driver_launch, "runner", runner)
    monkeypatch.setattr(runtime, "_device_of", lambda first: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(runtime, "_raw_stream", lambda index: 7)
    x = torch.zeros(4)
    with runtime.fresh_caches(keep_runners=True) as state:
        for _ in range(2):
            runtime.launch(kernel, (3,), (x, 5, 0.5), 4, 2, A=1, B=2)
        assert built == [(1, 2)] and driven == [((x, 5, 0.5), (3,), 7)] and not kernel.runner_calls
        answer[0] = False  # declined (a descriptor of another layout): Triton's runner launches
        runtime.launch(kernel, (3,), (x, 5, 0.5), 4, 2, A=1, B=2)
        assert len(driven) == 2 and kernel.runner_calls == [(3, 1, 1, 7)]
        with settings.override(triton_launcher="triton"):
            runtime.launch(kernel, (3,), (x, 6, 0.5), 4, 2, A=1, B=2)  # a new runner: none built
            runtime.launch(kernel, (3,), (x, 6, 0.5), 4, 2, A=1, B=2)
        assert len(built) == 1 and len(kernel.runner_calls) == 2
        assert [entry[2] is None for entry in state.runners.values()] == [False, True]


def test_launcher_without_kept_kernels_calls_triton_every_time():
    kernel = _FakeKernel()
    with runtime.fresh_caches(keep_runners=False):
        for _ in range(2):
            runtime.launch(kernel, (3,), (torch.zeros(4), 1, 0.5), 4, 2, A=1, B=2)
    assert len(kernel.jit_calls) == 2 and not kernel.runner_calls


def _launch_signature(kernel, grid, args, num_warps, num_stages, **constexprs):
    """What a launch compiles from: the kernel, its options, and each argument's dtype, shape and strides (tensors)
    or value (scalars)."""
    def arg(a):
        if isinstance(a, torch.Tensor):
            return a.dtype, tuple(a.shape), a.stride()
        if hasattr(a, "block_shape"):  # a Gluon TMA descriptor (the Hopper forwards'): its tensor's and its own
            return arg(a.base), tuple(a.shape), tuple(a.strides), runtime._other_key(a)
        return a

    return (kernel, grid, num_warps, num_stages, tuple(sorted(constexprs.items())), tuple(arg(a) for a in args))


def _compile_ahead(q, k, v, table, scale, compile_one):
    """`launch.compile_ahead` as a training call's forward runs it: with the table as `autograd._forward` hands it
    over (the Gluon forward reads a `CosSinTable` as fp16 and this one as fp32: different kernels)."""
    table = None if table is None else launch.Table(*table.cos_sin(), table.prefix_tokens, table.layout)
    launch.compile_ahead(q, k, v, table, scale, configs.for_call(q.device, q.shape[-1]), compile_one)


@pytest.mark.parametrize("shape_name", ["il_p1_7x10_d64", "half_p1_8x8_d32", "norope_p1_7x10_d64"])
def test_compile_ahead_plans_the_launches_of_a_training_call(shape_name):
    """`compile_ahead` compiles exactly what the forward and backward of a training call then launch (the upstream
    gradient in o's layout), once per key."""
    s, _, q, k, v, table = _case(shape_name, "fused", 5)
    planned = []
    with runtime.fresh_caches():
        _compile_ahead(q, k, v, table, s.D ** -0.5, lambda *a, **kw: planned.append(_launch_signature(*a, **kw)))
        _compile_ahead(q, k, v, table, s.D ** -0.5, lambda *a, **kw: planned.append("again"))  # the same key
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        with runtime.recording() as launches:
            o = autograd.attention(qg, kg, vg, table, s.D ** -0.5)
            o.backward(torch.randn_like(o))
    launched = [_launch_signature(x.kernel, x.grid, x.args, x.num_warps, x.num_stages, **x.constexprs)
                for x in launches]
    assert planned == launched
    # Hopper takes the Gluon forward and the fused backward at these lengths, others Triton's forward and split
    names = {x[0].fn.__name__ for x in planned}
    assert names & {"fwd_kernel", "resident_fwd_kernel", "resident_ws_fwd_kernel"}
    assert {"bwd_fused_kernel"} <= names or {"bwd_dkdv_kernel", "bwd_dq_kernel"} <= names


def test_compile_ahead_failure_warns_and_leaves_no_async_mode(caplog):
    s, _, q, k, v, table = _case("il_p1_7x10_d64", "contiguous", 6)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    with runtime.fresh_caches(), caplog.at_level("WARNING", logger=runtime.log.name):
        _compile_ahead(q, k, v, table, s.D ** -0.5, broken)
    assert "compiling ahead failed (RuntimeError: no compiler here)" in caplog.text
    from triton.runtime import _async_compile

    assert _async_compile.active_mode.get() is None  # later compiles are not left in async mode


def test_compile_ahead_builds_the_launchers_of_what_it_compiled(monkeypatch):
    """After compiling, `compile_ahead` builds the C launcher of every planned kernel not yet loaded, in the pool."""
    s, _, q, k, v, table = _case("il_p1_7x10_d64", "contiguous", 7)

    class Compiled:
        def __init__(self, name, module=None):
            self.src, self.metadata, self.module = f"src {name}", f"meta {name}", module

    planned = []
    compile_one = lambda kernel, *a, **kw: planned.append(kernel) or Compiled(  # noqa: E731
        kernel.fn.__name__, module="loaded" if len(planned) == 1 else None)  # the forward (Triton's or Gluon's)
    built = []

    class Driver:  # triton.runtime.driver: `active.launcher_cls(src, metadata)` builds a launcher
        class active:
            @staticmethod
            def launcher_cls(src, metadata):
                built.append((src, metadata))

    monkeypatch.setattr(triton.runtime, "driver", Driver)
    with runtime.fresh_caches():
        _compile_ahead(q, k, v, table, s.D ** -0.5, compile_one)
    expected = [(f"src {kernel.fn.__name__}", f"meta {kernel.fn.__name__}")
                for kernel in planned[1:]]  # an already loaded kernel has its launcher
    assert sorted(built) == sorted(expected) and len(built) == len(planned) - 1


def test_kept_runners_skip_the_hook_plumbing_only_while_no_hook_is_set():
    knobs = pytest.importorskip("triton.knobs")
    chain = knobs.HookChain()
    idle = type("Knobs", (), {"launch_enter_hook": chain, "launch_exit_hook": None})
    assert runtime._no_hooks(idle)
    chain.add(print)  # a profiler's hook: every launch must call it
    assert not runtime._no_hooks(idle)
    assert not runtime._no_hooks(type("Knobs", (), {"launch_enter_hook": None, "launch_exit_hook": print}))


# ------------------------------------------------------------------------------------------- background compiles
class _Arg:
    """A launch's first argument as `compiling` reads it: its device."""

    def __init__(self, device="cuda"):
        self.device = torch.device(device)


_Named = types.SimpleNamespace(fn=types.SimpleNamespace(__name__="named_kernel"))  # a kernel, as logs name it


@pytest.fixture
def background(monkeypatch):
    """`compiling` with its policy allowing every call, no CUDA graph capture, and its compiles run by `jobs`:
    {"started": [...]}, each job waiting for `release` (a threading.Event) and raising `fail` when set, else
    returning a kernel whose load appends it to jobs["loaded"]."""
    import threading

    jobs = {"started": [], "release": threading.Event(), "fail": None, "loaded": []}

    def compile_job(device, kernel, grid, args, num_warps, num_stages, constexprs):
        jobs["started"].append((kernel, grid, constexprs))
        jobs["release"].wait(10)
        if jobs["fail"] is not None:
            raise jobs["fail"]
        return types.SimpleNamespace(_init_handles=lambda: jobs["loaded"].append(kernel))

    monkeypatch.setattr(runtime, "_defers", lambda launch, device: True)
    monkeypatch.setattr(runtime, "_compile_in_background", compile_job)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with runtime.fresh_caches() as state:
        yield jobs, state
    jobs["release"].set()


def test_a_kernel_compiling_in_the_background_is_served_elsewhere_until_done(background, caplog):
    """The first call starts one compile (logged) and is served elsewhere, as is every call until it is done; then
    the kernel launches (False), and no compile starts again."""
    jobs, _ = background
    call = lambda: runtime.compiling("key", runtime.launch, _Named, (1,), (_Arg(),), 4, 1, A=1)  # noqa: E731
    with caplog.at_level("INFO", logger=runtime.log.name):
        assert call() is True and call() is True
    assert caplog.text.count("named_kernel: compiling in the background") == 1
    assert jobs["started"] == [(_Named, (1,), {"A": 1})]
    jobs["release"].set()
    assert runtime.wait_for_compiles(timeout=10) == 1
    assert call() is False and call() is False
    assert runtime.wait_for_compiles() == 0 and len(jobs["started"]) == 1


def test_a_failed_background_compile_warns_and_leaves_the_kernel_to_its_launch(background, caplog):
    jobs, _ = background
    jobs["fail"] = RuntimeError("ptxas died")
    call = lambda: runtime.compiling("key", runtime.launch, _Named, (1,), (_Arg(),), 4, 1)  # noqa: E731
    assert call() is True
    jobs["release"].set()
    runtime.wait_for_compiles(timeout=10)
    with caplog.at_level("WARNING", logger=runtime.log.name):
        assert call() is False  # the launch compiles it again and raises its error
    assert "named_kernel: compiling in the background failed (RuntimeError: ptxas died)" in caplog.text
    assert call() is False and len(jobs["started"]) == 1


def test_a_kernel_not_yet_loaded_is_not_launched_inside_a_cuda_graph_capture(background, monkeypatch):
    """Its module would load inside the capture (which forbids it): the other kernel serves and the graph keeps
    it; `wait_for_compiles` loads it, so that a graph captured after it launches it."""
    jobs, _ = background
    jobs["release"].set()
    call = lambda key: runtime.compiling(key, runtime.launch, _Named, (1,), (_Arg(),), 4, 1)  # noqa: E731
    assert call("a") is True and call("b") is True
    for key in "ab":
        runtime._state.background[key][0].result(timeout=10)  # compiled
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert call("a") is True and call("a") is True and jobs["loaded"] == []
    assert runtime.wait_for_compiles(timeout=10) == 0  # none still compiling; both loaded
    assert jobs["loaded"] == [_Named, _Named] and call("a") is False and call("b") is False


def test_wait_for_compiles_raises_when_its_time_runs_out(background):
    jobs, _ = background
    runtime.compiling("key", runtime.launch, _Named, (1,), (_Arg(),), 4, 1)
    with pytest.raises(TimeoutError, match="1 kernels still compiling after 0.01 s"):
        runtime.wait_for_compiles(timeout=0.01)
    jobs["release"].set()
    assert attnhub.wait_for_compiles(timeout=10) == 1  # the public entry


def test_background_compiles_are_asked_for_on_cuda_without_deterministic_algorithms_at_real_launches():
    """`_defers`: the setting, a CUDA device, no deterministic algorithms, a launch that runs or compile-ahead's
    planning; never a recording that does not run or another launcher."""
    from attnhub import settings

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    planner = lambda *a, **kw: None  # noqa: E731
    planner.plans_ahead = True
    with settings.override(background_compile=True), runtime.fresh_caches():
        assert runtime._defers(runtime.launch, cuda) and runtime._defers(planner, cuda)
        assert not runtime._defers(runtime.launch, cpu)
        assert not runtime._defers(lambda *a, **kw: None, cuda)  # e.g. a test's recording launcher
        with runtime.recording(run=False):
            assert not runtime._defers(runtime.launch, cuda)
        with runtime.recording(run=True):
            assert runtime._defers(runtime.launch, cuda)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            assert not runtime._defers(runtime.launch, cuda)  # the kernel serving a call must not depend on timing
        finally:
            torch.use_deterministic_algorithms(deterministic)
    with settings.override(background_compile=False):
        assert not runtime._defers(runtime.launch, cuda)


def test_a_background_compile_starts_after_the_calls_own_compiles(monkeypatch):
    """`_compile_in_background` waits while a call compiles what it launches (they would share the interpreter
    lock), then compiles the kernel and builds its launcher; its module is loaded on the caller's thread."""
    import time

    order = []
    compiled = types.SimpleNamespace(_init_handles=lambda: order.append("loaded"))
    monkeypatch.setattr(runtime, "compile_only", lambda *a, **kw: order.append("compiled") or compiled)
    monkeypatch.setattr(runtime, "_build_launchers", lambda kernels: order.append(("launchers", kernels)))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    with runtime._foreground:
        job = runtime._background_pool().submit(runtime._compile_in_background, torch.device("cuda", 0), _Named,
                                                (1,), (), 4, 1, {})
        time.sleep(0.2)
        assert order == [] and not job.done()
        order.append("call compiled")
    assert job.result(timeout=10) is compiled
    assert order == ["call compiled", "compiled", ("launchers", [compiled])]  # its module: not in this thread
