"""The only module of the Triton backends (triton_fa_rope, triton_rope_sdpa) that touches Triton's runtime
internals: every launch goes through `launch` (or `launch_keyed`, with a key its caller planned), which keeps
compiled runners per launch; Gluon descriptors copied from a checked one (`descriptor_maker`); and compiling a
training call's kernels ahead.

Kept runners: after the first launch of a specialization, `launch` calls Triton's compiled kernel directly instead
of `kernel[grid](...)`, which re-derives Triton's specialization key from every argument on every call (and, while
no launch hook is set, its launcher without the hook plumbing of `compiled[grid]`). The
compiled kernel's runner takes every parameter in signature order, constexprs included, as `kernel[grid]` passes
them to it: so in triton 3.6 and 3.8 (their sources were read for this); older versions use `kernel[grid]`. A TMA
descriptor argument (a Gluon kernel's) is keyed by what Triton specializes it on, its dtype, block shape and shared
layout; its base, shape and strides go to the runner, whose launcher encodes the tensor map from them. Building
that key from every argument costs 4-10 µs of host time per launch (benchmarks/README.md); a caller that plans
its launches per call signature passes its own key to `launch_keyed` instead. Where `_driver_launch` can, a kept
runner launches through the CUDA driver with its parameters packed once (`settings.triton_launcher`).

Compiling ahead: the first training call of a shape would compile its kernels one after another as the launches
reach them, and each would build its C launcher (a host-compiler run per kernel signature) at its first launch.
`compile_ahead` plans the same launches with a launcher that only compiles (`kernel.warmup`) inside Triton's
AsyncCompileMode, so they compile in parallel threads, then builds their C launchers in parallel (into Triton's
disk cache, where the first launches find them).

Compiling in the background: a Gluon forward takes 2.5-3 s to compile (the streaming one; its Python front end
alone about 1 s), the Triton kernels that can serve the same call under a second. `compiling` starts such a
kernel's compile in a background thread at its first call and tells the caller to serve the call with its Triton
kernel until it is done (`settings.background_compile`; never where deterministic algorithms are asked for, so
the kernel serving a call does not depend on timing). A background compile starts once the call's own compiles are
done (they would share the interpreter lock). `wait_for_compiles` blocks until they are done and loads them.

Tests observe launches with `recording()` and start from empty caches with `fresh_caches()`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Any, Callable, Iterator, NamedTuple

import torch
import triton

from attnhub import settings
from attnhub.backends import _driver_launch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, as Triton does (and configs.py)
log = logging.getLogger("attnhub.backends")


def _triton_at_least(major: int, minor: int) -> bool:
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (major, minor)


KEEPS_RUNNERS = not INTERPRET and _triton_at_least(3, 6)  # where `launch` can keep compiled runners
CAN_COMPILE_AHEAD = not INTERPRET and hasattr(triton, "AsyncCompileMode")
_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)  # where launch hooks are set (3.6+)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's driver launches on
_RUNNERS_MAX = 4096  # distinct launches kept (shapes, strides, dtypes, configs): cleared when full
_AHEAD_MAX = 4096


class Launch(NamedTuple):
    """One kernel launch as `launch` receives it (key: `launch_keyed`'s, None from `launch`)."""

    kernel: Any
    grid: tuple
    args: tuple
    num_warps: int
    num_stages: int
    constexprs: dict
    key: Any = None

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _State:
    """The caches, and the recorder of `recording`."""

    __slots__ = ("keep_runners", "runners", "compiled_ahead", "background", "recorder", "record_runs", "calls")

    def __init__(self, keep_runners: bool) -> None:
        self.keep_runners = keep_runners
        self.runners: dict = {}
        self.compiled_ahead: set = set()
        self.background: dict = {}  # key -> (its compile's Future, device), or _READY once done (`compiling`)
        self.recorder: list[Launch] | None = None
        self.record_runs = True
        self.calls: dict = {}  # per call signature, a whole call's replay of kept runners (`replay_cache`)


_state = _State(KEEPS_RUNNERS)
_dry = threading.local()  # .launches: this thread's `dry_run` list, else absent or None
_foreground = threading.RLock()  # held while a call compiles what it launches (`compile_ahead`, a kept runner's miss)


def launch(kernel, grid: tuple, args: tuple, num_warps: int, num_stages: int, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) with the launch options: every launch of the backend goes through here.

    Triton launches on the current CUDA device and its stream; args[0] (a tensor or a descriptor of one) says which
    device the call is on, and it is made current when it is not (tensors on cuda:1 while cuda:0 is current).
    The key of the kept runners holds everything Triton specializes on, and more: the exact value and type of every
    scalar, each tensor's dtype and 16-byte alignment, the constexprs, the launch options and the device."""
    launch_keyed(None, kernel, grid, args, num_warps, num_stages, **constexprs)


def launch_keyed(key, kernel, grid: tuple, args: tuple, num_warps: int, num_stages: int, **constexprs) -> None:
    """`launch`, its kept runner found by the caller's `key` (None: `launch`'s own, built from every argument).

    A caller that plans its launches per call signature (`gluon_fwd`) knows what its arguments are: its key must
    determine everything `launch`'s key holds (the int arguments' values, each tensor's dtype and 16-byte alignment,
    the descriptors' dtype, block and layout, the scalars, the constexprs, the launch options); the kernel and the
    device are added here."""
    dev = _device_of(args[0])
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            launch_keyed(key, kernel, grid, args, num_warps, num_stages, **constexprs)
        return
    state = _state
    dry = getattr(_dry, "launches", None)
    if dry is not None:
        dry.append(Launch(kernel, grid, args, num_warps, num_stages, constexprs, key))
        return
    if state.recorder is not None:
        state.recorder.append(Launch(kernel, grid, args, num_warps, num_stages, constexprs, key))
        if not state.record_runs:
            return
    if not state.keep_runners:
        kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        return
    key = _runner_key(key, kernel, dev, args, num_warps, num_stages, constexprs)
    hit = state.runners.get(key)
    if hit is None:
        with _foreground:  # a compile here comes first: background compiles wait for it (`_compile_in_background`)
            compiled = kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        params = kernel.params[len(args):]
        if not all(p.is_constexpr and p.name in constexprs for p in params):  # not this backend's kernel layout
            return
        if len(state.runners) >= _RUNNERS_MAX:
            state.runners.clear()
        tail = tuple(constexprs[p.name] for p in params)
        driver = (_driver_launch.runner(compiled, args, tail)
                  if dev.type == "cuda" and settings.triton_launcher() == "driver" else None)
        state.runners[key] = (compiled, tail, driver)
        return
    compiled, tail, driver = hit
    g = (*grid, 1, 1)
    if dev.type == "cuda" and _no_hooks(_RUNTIME_KNOBS):  # the runner's own work, minus its hook plumbing
        stream = _raw_stream(dev.index)
        if driver is None or not driver(args, grid, stream):
            compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                         *args, *tail)
    else:
        compiled[g[:3]](*args, *tail)


def _runner_key(key, kernel, dev: torch.device, args: tuple, num_warps: int, num_stages: int, constexprs: dict):
    """The kept runners' key of a launch: the caller's planned key, else one built from every argument (ints as
    themselves, the common case and the cheapest; tensors by dtype and 16-byte alignment; other scalars with their
    type)."""
    if key is not None:
        return ("keyed", kernel, dev.index, key)
    return (kernel, dev.index, num_warps, num_stages, tuple(constexprs.items()),
            tuple([a if type(a) is int else (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                   else _other_key(a) for a in args]))


def kept_runner(launch: Launch):
    """-> (compiled kernel, its driver launch) of the kept runner that serves this launch (as recorded by `dry_run`),
    or None where there is none yet or it launches through Triton's launcher."""
    dev = _device_of(launch.args[0])
    hit = _state.runners.get(_runner_key(launch.key, launch.kernel, dev, launch.args, launch.num_warps,
                                         launch.num_stages, launch.constexprs))
    return None if hit is None or hit[2] is None else (hit[0], hit[2])


@contextlib.contextmanager
def dry_run() -> Iterator[list[Launch]]:
    """Within the block, this thread's launches (only this thread's) are appended to the list yielded and do not
    run, and start no background compile: what `_replay` records of a planned call."""
    saved = getattr(_dry, "launches", None)
    _dry.launches = []
    try:
        yield _dry.launches
    finally:
        _dry.launches = saved


def background_pending() -> bool:
    """Whether a background compile is still running: until it is done, a call's launches may be those of the
    kernel serving in its place."""
    return any(job is not _READY and not job[0].done() for job in _state.background.values())


def _device_of(first) -> torch.device:
    """The device of a launch: that of its first argument, a tensor or a TMA descriptor of one (a Gluon kernel's)."""
    return first.device if isinstance(first, torch.Tensor) else getattr(first, "base", first).device


def aligned(*tensors: torch.Tensor) -> bool:
    """Whether every tensor's base is 16-byte aligned, as TMA reads need and as a caller's planned `launch_keyed`
    key assumes (checked per call: the plans are per call signature, the addresses are not)."""
    ptr = 0
    for t in tensors:
        ptr |= t.data_ptr()
    return ptr % 16 == 0


def replay_cache() -> dict | None:
    """The cache of whole calls replayed from their kept runners' driver launches (`triton_fa_rope.replay`), or None
    where a call must launch through here: no runners kept, launches recorded (`recording`), a Triton launch hook
    set (a profiler's) or the driver launches off (`settings.triton_launcher`)."""
    state = _state
    if (not state.keep_runners or state.recorder is not None or not _no_hooks(_RUNTIME_KNOBS)
            or settings.triton_launcher() != "driver"):
        return None
    return state.calls


def _no_hooks(knobs) -> bool:
    """Whether no launch hook is set (a profiler's): then the runner's launch metadata and its calls of two empty
    hook chains per launch (Triton 3.6+) can be skipped."""
    return all(hook is None or not getattr(hook, "calls", True)
               for hook in (knobs.launch_enter_hook, knobs.launch_exit_hook))


def _other_key(arg) -> tuple:
    """The key of an argument that is neither an int nor a tensor: a TMA descriptor's dtype, block shape and layout
    (Triton specializes on nothing else of it), a scalar's type and value."""
    block = getattr(arg, "block_shape", None)
    if block is not None:
        return ("tensordesc", arg.base.dtype, tuple(block), getattr(arg, "layout", None), getattr(arg, "padding", None))
    return (type(arg), arg)


def remember(cache: dict, key, make: Callable[[], Any], max_size: int = 1024):
    """cache[key], made by `make()` on a miss: the per-call-signature plans of the Gluon launchers (a full cache is
    cleared, so many shapes cannot grow it without bound)."""
    hit = cache.get(key, cache)
    if hit is cache:
        if len(cache) >= max_size:
            cache.clear()
        hit = cache[key] = make()
    return hit


def descriptor_maker(cls, example: torch.Tensor, shape: list, strides: list, block_shape: list,
                     layout) -> Callable[[torch.Tensor], Any]:
    """-> make(base): `cls(base, shape, strides, block_shape, layout)` (a Gluon `TensorDescriptor`) for tensors of
    `example`'s dtype, at a fraction of its host cost: `cls` builds and checks the descriptor of `example` once,
    `make` copies its fields with its own base. Callers check what `cls` would of each base (16-byte aligned,
    as `gluon_fwd` does)."""
    checked = cls(example, shape, strides, block_shape, layout)
    if not hasattr(checked, "__dict__"):  # a descriptor class with slots (no Triton so far): constructed every call
        return lambda base: cls(base, shape, strides, block_shape, layout)
    fields = {**checked.__dict__, "base": None}  # holds no tensor alive
    new = object.__new__

    def make(base: torch.Tensor):
        desc = new(cls)
        desc.__dict__.update(fields)
        desc.base = base
        return desc

    return make


@functools.lru_cache(maxsize=1)
def _compile_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="attnhub-compile")


def compile_only(kernel, grid: tuple, args: tuple, num_warps: int, num_stages: int, **constexprs):
    """-> the compiled kernel, or a `triton.FutureKernel` inside AsyncCompileMode."""
    return kernel.warmup(*args, grid=grid, num_warps=num_warps, num_stages=num_stages, **constexprs)


def _build_launchers(kernels: list) -> None:
    """Build the C launchers of compiled kernels not yet loaded, in parallel (they land in Triton's disk cache)."""
    from triton.runtime import driver

    builds = [_compile_pool().submit(driver.active.launcher_cls, kernel.src, kernel.metadata)
              for kernel in kernels if kernel is not None and getattr(kernel, "module", None) is None]
    for build in builds:
        build.result()


def compile_ahead(key, device: torch.device, plan: Callable[[Callable], None], compile_one=None) -> None:
    """Once per `key`: `plan(launcher)` makes the launches of a call with a launcher that compiles each kernel
    (`compile_one`, default `compile_only`) in Triton's AsyncCompileMode; then the C launchers are built.

    Only an optimization: should planning or compiling fail, a warning says so and the launches compile (and
    report their own errors) as they would without it."""
    compile_one = compile_one or compile_only
    done = _state.compiled_ahead
    if key in done:
        return
    if len(done) >= _AHEAD_MAX:
        done.clear()
    done.add(key)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    planned = []

    def plan_one(*args, **kwargs):
        planned.append(compile_one(*args, **kwargs))

    plan_one.plans_ahead = True  # a kernel that `compiling` defers is not compiled here (`_defers`)

    try:
        with _foreground, on_device, triton.AsyncCompileMode(_compile_pool(), ignore_errors=True):
            plan(plan_one)
        with _foreground:
            _build_launchers([p.result(ignore_errors=True) if isinstance(p, triton.FutureKernel) else p
                              for p in planned])
    except Exception as exc:  # noqa: BLE001 - the launches that follow compile and raise on their own
        log.warning("triton_fa_rope: compiling ahead failed (%s: %s); kernels compile at their launches",
                    type(exc).__name__, exc)


_READY = True


@functools.lru_cache(maxsize=1)
def _background_pool():
    from concurrent.futures import ThreadPoolExecutor

    # two: a second kernel's front end overlaps the first's LLVM and ptxas; more would take the foreground's CPU
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="attnhub-background")


def _defers(launcher, device: torch.device) -> bool:
    """Whether a kernel not yet compiled may be left to a background compile: asked for (`settings`), on CUDA,
    without deterministic algorithms, and at a launch that runs (`launch`, not a recording that does not run) or
    compile-ahead's planning."""
    if launcher is launch:
        if (_state.recorder is not None and not _state.record_runs) or getattr(_dry, "launches", None) is not None:
            return False
    elif not getattr(launcher, "plans_ahead", False):
        return False
    return device.type == "cuda" and settings.background_compile() and not torch.are_deterministic_algorithms_enabled()


def _compile_in_background(device: torch.device, kernel, grid: tuple, args: tuple, num_warps: int,
                           num_stages: int, constexprs: dict):
    """-> the compiled kernel, its C launcher built (into Triton's disk cache). Its module is loaded on the
    caller's thread (`_load`): a module load here could meet a CUDA graph capture there, which forbids it."""
    with _foreground:  # the call's own compiles first: they share the interpreter lock with this one's front end
        pass
    with torch.cuda.device(device):  # Triton compiles for the current device (in this thread: cuda:0)
        compiled = compile_only(kernel, grid, args, num_warps, num_stages, **constexprs)
    _build_launchers([compiled])
    return compiled


def _load(job, device: torch.device) -> None:
    """Load a background compile's kernel (module, launcher), unless it failed (its launch compiles it again)."""
    if job.exception() is None:
        with torch.cuda.device(device):
            job.result()._init_handles()


def compiling(key, launcher, kernel, grid: tuple, args: tuple, num_warps: int, num_stages: int,
              **constexprs) -> bool:
    """Whether this launch's kernel is compiling in the background, so that the caller serves the call with another
    kernel. At its first call (per `key`, which names the kernel's specialization, as `launch_keyed`'s) where
    `_defers` allows, its compile starts in a background thread; until it is done, True. False once it is done,
    and always where it was not deferred (the launch compiles it, as without this). A compile that failed is not
    retried here: the launch compiles it again and raises its error. While a CUDA graph is captured, a kernel not
    yet loaded is not launched (True): its module would load inside the capture; `wait_for_compiles` loads it."""
    state = _state
    job = state.background.get(key)
    if job is _READY:
        return False
    dev = _device_of(args[0])
    if job is None:
        if not _defers(launcher, dev):
            return False
        if len(state.background) >= _AHEAD_MAX:
            state.background.clear()
        state.background[key] = (_background_pool().submit(_compile_in_background, dev, kernel, grid, args,
                                                           num_warps, num_stages, constexprs), dev)
        log.info("%s: compiling in the background; another kernel serves its calls until it is ready",
                 kernel.fn.__name__)
        return True
    future = job[0]
    if not future.done():
        return True
    if future.exception() is not None:
        log.warning("%s: compiling in the background failed (%s: %s); it compiles again at its launch",
                    kernel.fn.__name__, type(future.exception()).__name__, future.exception())
    elif dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    state.background[key] = _READY
    return False


def wait_for_compiles(timeout: float | None = None) -> int:
    """Block until every compile started in the background is done (`timeout`: seconds, None for no limit), and
    load their kernels, so that a CUDA graph captured next may launch them; -> how many were still compiling.
    Raises TimeoutError when the time runs out."""
    from concurrent.futures import wait

    state = _state
    jobs = {key: job for key, job in list(state.background.items()) if job is not _READY}
    running = [future for future, _ in jobs.values() if not future.done()]
    if running and wait(running, timeout).not_done:
        raise TimeoutError(f"attnhub: {len(running)} kernels still compiling after {timeout} s")
    for key, (future, device) in jobs.items():
        _load(future, device)
        if future.exception() is None:
            state.background[key] = _READY
    return len(running)


@contextlib.contextmanager
def fresh_caches(keep_runners: bool | None = None) -> Iterator[_State]:
    """Within the block: empty kept-runner, compiled-ahead and background caches (`.runners`, `.compiled_ahead`,
    `.background` of the state yielded), runners kept iff `keep_runners` (None: where Triton allows); the previous
    state after it. For tests."""
    global _state
    saved = _state
    _state = _State(KEEPS_RUNNERS if keep_runners is None else keep_runners)
    try:
        yield _state
    finally:
        _state = saved


@contextlib.contextmanager
def recording(run: bool = True) -> Iterator[list[Launch]]:
    """Within the block every launch is appended to the list yielded, and runs only if `run`. For tests."""
    saved = _state.recorder, _state.record_runs
    _state.recorder, _state.record_runs = [], run
    try:
        yield _state.recorder
    finally:
        _state.recorder, _state.record_runs = saved
