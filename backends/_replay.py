"""Replaying a planned call's kernel launches from C++ (`_replay.cpp`): one crossing from Python per call instead of
an allocation and a launch each.

Why: a cached eager training call of triton_fa_rope at a tiny shape cost 1.8-1.9x the host time of F.sdpa's own
fwd+bwd with every launch through the driver (`_driver_launch`); a Python Function whose forward and backward are one
C++ call each cost 1.25x (benchmarks/README.md, session 16: `benchmarks/host_profile.py --sections floor`). The rest
is Python around the launches: allocating outputs, making descriptors, keys, `launch_keyed`'s lookups.

A `Body` is built from a dry run of the call (`runtime.dry_run`: its launches recorded, not run), the tensors it
was given (`inputs`) and those it allocated (`allocated`: returned and scratch). Every tensor a recorded launch
reads (a pointer argument, a TMA descriptor's base) must be one of those or of `constants` (found by address); every
launch must have a kept runner with a driver launch (`runtime.kept_runner`), whose packed parameters the body
copies. Anything else (a tensor the call computed with PyTorch, a launch through Triton's launcher) and `body`
returns None: the call keeps its Python path. Then each run writes the new tensors' addresses into the copied
parameters and launches the same kernels with the same grids, in order.

The extension is built once per machine (torch.utils.cpp_extension, into its cache; about 15 s, a C++ compiler and
ninja needed) in a background thread, started by the first `extension()` call; until it is loaded `extension()`
returns None. A failed build is logged once, and the Python paths serve.
"""

from __future__ import annotations

import ctypes
import logging
import pathlib
import threading
from typing import Sequence

import torch
import triton

from attnhub.backends import _triton_runtime as runtime

log = logging.getLogger("attnhub.backends")
_SOURCE = pathlib.Path(__file__).with_name("_replay.cpp")


class _Build:
    """The extension's build: started once, in a background thread; `module` once loaded."""

    def __init__(self) -> None:
        self.module = None
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._build, name="attnhub-replay-build", daemon=True)
                self.thread.start()

    def _build(self) -> None:
        try:
            from torch.utils.cpp_extension import load

            include = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "include"  # Triton's cuda.h
            self.module = load("attnhub_replay", [str(_SOURCE)], extra_include_paths=[str(include)],
                               extra_cflags=["-O2"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - any build failure: the Python paths serve, as without it
            log.warning("attnhub: the C++ replay of training calls could not be built (%s: %s); they run through "
                        "Python", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")


_build = _Build()


def extension():
    """The loaded extension, or None while it builds (the first call starts its build) or where it failed."""
    module = _build.module
    if module is None and _build.thread is None:
        _build.start()
    return module


def wait(timeout: float | None = None) -> bool:
    """Block until the extension's build (if started) is done; -> whether it is loaded."""
    thread = _build.thread
    if thread is not None:
        thread.join(timeout)
    return _build.module is not None


class Body:
    """A registered body: `body(*inputs)` -> its returned tensors, or None where the Python path must run the call
    (an input not 16-byte aligned, as every kernel was specialized for; a thread without a CUDA context)."""

    __slots__ = ("module", "id", "keep")

    def __init__(self, module, body_id: int, keep: tuple) -> None:
        self.module, self.id, self.keep = module, body_id, keep

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor] | None:
        out = self.module.run(self.id, inputs)
        if out:
            return out
        _raise_kept_error(self.module)
        return None

    def __del__(self) -> None:
        try:
            self.module.release(self.id)
        except Exception:  # noqa: BLE001 - at interpreter exit the module may be gone
            pass


def body(launches: Sequence[runtime.Launch], inputs: Sequence[torch.Tensor], returned: Sequence[torch.Tensor],
         scratch: Sequence[torch.Tensor] = (), constants: Sequence[torch.Tensor] = ()) -> Body | None:
    """The body of a dry run's launches: called with tensors laid out as `inputs`, it allocates tensors laid out as
    `returned` and `scratch` (same sizes, strides and dtypes, on the inputs' device), launches, and returns the
    first. A launch's pointer may also address a view into an allocation (e.g. dk inside a packed projection's
    gradient): its slot and byte offset. None where the launches read a tensor that is none of these (by address;
    an address two of them share is ambiguous), or one launch has no kept driver launch yet."""
    module = extension()
    if module is None or not launches:
        return None
    allocated = (*returned, *scratch)
    slots = (*inputs, *allocated, *constants)
    addresses = [t.data_ptr() for t in slots]
    if len(set(addresses)) != len(addresses) or 0 in addresses:
        return None
    slot_of = _Slots(addresses, {len(inputs) + i: _extent(t) for i, t in enumerate(allocated)})
    specs, keep = [], []
    for launch in launches:
        kept = runtime.kept_runner(launch)
        spec = None if kept is None else _spec(kept[1], launch, slot_of)
        if spec is None:
            return None
        specs.append(spec)
        keep.append(kept)
    allocations = [(list(t.shape), list(t.stride()), t.new_empty(0)) for t in allocated]
    body_id = module.add(len(inputs), allocations, list(constants), specs, list(range(len(inputs),
                                                                                      len(inputs) + len(returned))))
    if body_id < 0:
        _raise_kept_error(module)
    return Body(module, body_id, (tuple(keep), tuple(constants)))


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes a tensor of these sizes and strides addresses."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else -1
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class _Slots:
    """address -> (slot, byte offset): a slot's own address (offset 0), or an address inside an allocation (a view
    into it, found by the allocations' extents, which never overlap)."""

    def __init__(self, addresses: list[int], extents: dict[int, tuple[int, int]]) -> None:
        self.exact = {address: i for i, address in enumerate(addresses)}
        self.extents = extents

    def get(self, address: int) -> tuple[int, int] | None:
        slot = self.exact.get(address)
        if slot is not None:
            return slot, 0
        for slot, (first, end) in self.extents.items():
            if first <= address < end:
                return slot, address - first
        return None


def _raise_kept_error(module) -> None:
    """Raise the extension's kept error, if any (it returns errors rather than throw them: `_replay.cpp`)."""
    error = module.take_error()
    if error:
        raise RuntimeError(error)


def _spec(runner, launch: runtime.Launch, slot_of: _Slots) -> tuple | None:
    """`_replay.cpp`'s launch spec of a driver launch (`_driver_launch.Runner`) for this recorded launch, its
    tensors found in `slot_of`; None where one is not there, or a descriptor differs from the runner's or addresses
    inside another tensor."""
    start = ctypes.addressof(runner.buffer)
    size = ctypes.sizeof(runner.buffer) - (runner.base - start)
    args = launch.args
    pointers = []
    for word, i in runner.pointers:
        found = slot_of.get(args[i].data_ptr())
        if found is None:
            return None
        pointers.append((8 * word - (runner.base - start), *found))
    maps = []
    for address, i, shape, strides in runner.maps:
        desc = args[i]
        found = slot_of.get(desc.base.data_ptr())
        if found is None or found[1] or list(desc.shape) != list(shape) or list(desc.strides) != list(strides):
            return None
        maps.append((address - runner.base, found[0]))
    offsets = [address - runner.base for address in runner.params]
    grid = [int(g) for g in launch.grid]
    return (runner.function, grid, runner.block, runner.shared, ctypes.string_at(runner.base, size), offsets,
            pointers, maps)
