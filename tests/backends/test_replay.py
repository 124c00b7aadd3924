"""`backends/_replay`: a dry run's launches turned into a body's slots and launch specs (CPU, with stand-in runners
and extension), the body's allocations and refusals in the built extension (CPU: a body without launches), and
`runtime.dry_run` recording only its own thread's launches. On a GPU, whole training calls replayed:
tests/backends/triton_fa_rope/test_replay.py."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import textwrap
import threading
import types

import pytest
import torch

from attnhub.backends import _driver_launch as dl
from attnhub.backends import _replay
from attnhub.backends import _triton_runtime as runtime
from tests.backends.test_driver_launch import _compiled, _Desc, _FakeDriver


class _Module:
    """A stand-in extension: records what `add` registers."""

    def __init__(self):
        self.added = []

    def add(self, *args):
        self.added.append(args)
        return 7

    def release(self, body_id):
        pass


def _runner():
    """A runner of kernel(D: a descriptor, X: *fp32, n: i32): map @0, shape @128, strides @136, X @152, n @160."""
    meta = [dict(swizzle=3, elem_size=2, elem_type=10, block_size=[64, 64], fp4_padded=False)]
    example = _Desc(torch.zeros(64, 64, dtype=torch.bfloat16), [64, 64], [64, 1])
    sig = {"D": "tensordesc<bf16[64,64]>", "X": "*fp32", "n": "i32"}
    return dl._build(_FakeDriver([128, 4, 4, 8, 8, 8, 4, 8, 8]), _compiled(sig, tensordesc_meta=meta),
                     (example, torch.zeros(2), 3), ()), example


@pytest.fixture
def module(monkeypatch):
    fake = _Module()
    monkeypatch.setattr(_replay, "extension", lambda: fake)
    return fake


def test_body_maps_each_launchs_tensors_to_slots(module, monkeypatch):
    """Inputs, then allocations (returned, then scratch), then constants: each pointer word and tensor map of the
    runner's buffer gets its tensor's slot, the buffer is copied from its aligned start, the grid as recorded."""
    runner, example = _runner()
    monkeypatch.setattr(runtime, "kept_runner", lambda launch: ("compiled", runner))
    q, out, scratch = torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(4), torch.zeros(3)
    launches = [runtime.Launch("k", (5,), (_Desc(q, example.shape, example.strides), out, 3), 4, 1, {}),
                runtime.Launch("k", (2, 3), (_Desc(out, example.shape, example.strides), scratch, 3), 4, 1, {})]
    body = _replay.body(launches, (q,), (out,), (scratch,))
    assert body is not None and body.id == 7
    ((n_inputs, allocations, constants, specs, returned),) = module.added
    assert n_inputs == 1 and returned == [1] and constants == []
    assert [(sizes, strides, like.dtype) for sizes, strides, like in allocations] == \
        [([4], [1], torch.float32), ([3], [1], torch.float32)]
    first, second = specs
    function, grid, block, shared, raw, offsets, pointers, maps = first
    assert (function, grid, block, shared) == (0x1234, [5], 128, 1024)
    assert raw == ctypes.string_at(runner.base, len(raw)) and offsets == [0, 128, 132, 136, 144, 152, 160, 168, 176]
    assert pointers == [(152, 1, 0)] and maps == [(0, 0)]
    assert second[1] == [2, 3] and second[6] == [(152, 2, 0)] and second[7] == [(0, 1)]


def test_a_pointer_into_an_allocation_is_its_slot_and_offset(module, monkeypatch):
    """A view into a returned allocation (dk inside a packed projection's gradient): its slot and byte offset; a
    descriptor of such a view, or an address past every allocation, is refused."""
    runner, example = _runner()
    monkeypatch.setattr(runtime, "kept_runner", lambda launch: ("compiled", runner))
    q, grad = torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(3, 4)
    launches = [runtime.Launch("k", (1,), (_Desc(q, example.shape, example.strides), grad[1], 3), 4, 1, {})]
    assert _replay.body(launches, (q,), (grad,)) is not None
    assert module.added[-1][3][0][6] == [(152, 1, 16)]  # row 1 of fp32 [3, 4]: 16 bytes in
    module.added.clear()
    past = torch.zeros(12)[4:]  # another tensor's storage
    launches = [runtime.Launch("k", (1,), (_Desc(q, example.shape, example.strides), past, 3), 4, 1, {})]
    assert _replay.body(launches, (q,), (grad,)) is None
    inner = torch.zeros(2, 64, 64, dtype=torch.bfloat16)
    launches = [runtime.Launch("k", (1,), (_Desc(inner[1], example.shape, example.strides), grad, 3), 4, 1, {})]
    assert _replay.body(launches, (q,), (inner, grad)) is None and not module.added


@pytest.mark.parametrize("case", ["unknown tensor", "shared address", "no runner", "other descriptor strides"])
def test_body_refuses_what_it_cannot_replay(case, module, monkeypatch):
    """None (the Python path serves) where a launch reads a tensor that is neither input, allocation nor constant (a
    tensor the call computed with PyTorch), where two slots share an address, where a launch has no kept driver
    launch, and where a descriptor is laid out otherwise than the runner's."""
    runner, example = _runner()
    kept = None if case == "no runner" else ("compiled", runner)
    monkeypatch.setattr(runtime, "kept_runner", lambda launch: kept)
    q, out = torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(4)
    strides = [128, 1] if case == "other descriptor strides" else example.strides
    x = torch.zeros(4) if case == "unknown tensor" else out
    inputs = (q, q.view(-1)) if case == "shared address" else (q,)
    launches = [runtime.Launch("k", (1,), (_Desc(q, example.shape, strides), x, 3), 4, 1, {})]
    assert _replay.body(launches, inputs, (out,)) is None and not module.added


def test_body_waits_for_the_extension(monkeypatch):
    monkeypatch.setattr(_replay, "extension", lambda: None)
    assert _replay.body([runtime.Launch("k", (1,), (torch.zeros(1),), 4, 1, {})], (torch.zeros(1),), ()) is None


class _Kernel:
    """Records `kernel[grid](*args)` calls (a launch that runs)."""

    def __init__(self):
        self.ran = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.ran.append((threading.current_thread().name, grid))


def test_dry_run_records_only_its_own_threads_launches():
    """Inside `dry_run` this thread's launches are recorded (with `launch_keyed`'s key) and do not run; another
    thread's launches at the same time run, unrecorded."""
    kernel = _Kernel()
    with runtime.fresh_caches(keep_runners=False):  # the stand-in kernel launches as given (no runner to keep)
        with runtime.dry_run() as launches:
            runtime.launch_keyed("my key", kernel, (3,), (torch.zeros(1), 5), 4, 1, BLOCK=16)
            other = threading.Thread(target=runtime.launch, args=(kernel, (2,), (torch.zeros(1),), 4, 1), name="other")
            other.start()
            other.join()
        assert [(r.grid, r.args[1], r.key, r.constexprs) for r in launches] == [((3,), 5, "my key", {"BLOCK": 16})]
        assert kernel.ran == [("other", (2,))]
        runtime.launch(kernel, (1,), (torch.zeros(1),), 4, 1)  # after the block: runs again
        assert len(kernel.ran) == 2


def test_replay_cache_only_where_calls_launch_through_kept_runners():
    """No replay while launches are recorded, without kept runners or with Triton's launcher."""
    from attnhub import settings

    with runtime.fresh_caches(keep_runners=True) as state:
        assert runtime.replay_cache() is state.calls
        with runtime.recording():
            assert runtime.replay_cache() is None
        with settings.override(triton_launcher="triton"):
            assert runtime.replay_cache() is None
    with runtime.fresh_caches(keep_runners=False):
        assert runtime.replay_cache() is None


def test_background_pending_only_while_a_compile_runs():
    """A replay is not built while a background compile runs (its call's launches may be the stand-in kernel's);
    a compile that is done counts as not pending, whether or not its call has seen it."""
    from concurrent.futures import Future

    with runtime.fresh_caches() as state:
        running, done = Future(), Future()
        done.set_result(None)
        state.background.update(a=(done, None), b=runtime._READY)
        assert not runtime.background_pending()
        state.background["c"] = (running, None)
        assert runtime.background_pending()


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler")
def test_extension_allocates_returns_and_refuses_misaligned_inputs():
    """The built extension (CPU tensors, a body without launches): allocations with the registered sizes, strides
    and dtypes on the inputs' device, constants and inputs by slot, nothing for an input not 16-byte aligned, a
    RuntimeError for the wrong number of inputs (kept by the extension, raised by `Body`), -1 and the error kept for a
    bad body, and `release`."""
    _replay.extension()
    assert _replay.wait(600), "the extension did not build (see the log)"
    ext = _replay.extension()
    const = torch.arange(3.0)
    like = torch.empty(0, dtype=torch.bfloat16)
    body = _replay.Body(ext, ext.add(2, [([2, 3], [1, 2], like)], [const], [], [2, 3, 0]), ())
    x, y = torch.zeros(8), torch.ones(8)
    allocated, constant, first = body(x, y)
    assert allocated.shape == (2, 3) and allocated.stride() == (1, 2) and allocated.dtype == torch.bfloat16
    assert constant is const or torch.equal(constant, const)
    assert first.data_ptr() == x.data_ptr()
    assert body(x[1:], y) is None  # 4 bytes past an aligned base
    with pytest.raises(RuntimeError, match="takes 2 inputs"):
        body(x)
    assert body(x, y) is not None  # the error was taken
    assert ext.add(2, [], [], [], [5]) == -1 and "returned slot out of range" in ext.take_error()
    count = ext.count()
    del body
    assert ext.count() == count - 1


def test_wait_without_a_build_started(monkeypatch):
    monkeypatch.setattr(_replay, "_build", types.SimpleNamespace(thread=None, module=None))
    assert _replay.wait(0) is False


# A stand-in libcuda (soname libcuda.so.1, loaded before the extension resolves the driver): records each launch's
# function, grid, block, shared bytes, its parameters' offsets from the first and the buffer's bytes, and each tensor
# map replacement; `result` is what cuLaunchKernel returns.
_FAKE_LIBCUDA = r"""
#include <stdint.h>
#include <string.h>
int result = 0, nparams = 0, nbytes = 0, launches = 0, replaced = 0;
uint64_t func[8], grid[8][3], block[8], shared[8], base[8], offsets[8][16], maps[16][2];
unsigned char bytes[8][512];
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned sh, void* stream, void** params, void** extra) {
  if (result) return result;
  int i = launches++;
  func[i] = (uint64_t)f; grid[i][0] = gx; grid[i][1] = gy; grid[i][2] = gz; block[i] = bx; shared[i] = sh;
  base[i] = (uint64_t)params[0];
  for (int p = 0; p < nparams; ++p) offsets[i][p] = (uint64_t)params[p] - (uint64_t)params[0];
  memcpy(bytes[i], params[0], nbytes);
  return 0;
}
int cuTensorMapReplaceAddress(void* map, void* address) {
  maps[replaced][0] = (uint64_t)map; maps[replaced][1] = (uint64_t)address; ++replaced;
  return 0;
}
int cuGetErrorString(int error, const char** text) { *text = "stand-in error"; return 0; }
"""

_FAKE_RUN = r"""
import ctypes, struct, sys
import torch
fake = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)
from attnhub.backends import _replay

def var(name, ty=ctypes.c_int):
    return ty.in_dll(fake, name)

_replay.extension()
assert _replay.wait(600), "the extension did not build"
ext = _replay.extension()
var("nparams").value, var("nbytes").value = 3, 144
first = bytearray(144)
first[:128] = b"\xab" * 128  # a tensor map, its base replaced per run
struct.pack_into("i", first, 136, 7)  # an int parameter, packed once
specs = [(0x1234, [5], 128, 1024, bytes(first), [0, 128, 136], [(128, 1, 0)], [(0, 0)]),
         (0x5678, [2, 3, 4], 256, 0, bytes(16), [0, 8], [(0, 2, 0), (8, 2, 12)], [])]  # the second: 12 bytes in
x, y = torch.zeros(16), torch.ones(16)
body = ext.add(2, [([4], [1], torch.empty(0))], [], specs, [2])
(out,) = ext.run(body, [x, y])
assert var("launches").value == 2 and out.shape == (4,)
SIZES = dict(func=8, grid=24, block=8, shared=8, base=8, offsets=128, maps=32)
u64 = lambda name: (ctypes.c_uint64 * SIZES[name]).in_dll(fake, name)
assert (u64("func")[0], u64("func")[1]) == (0x1234, 0x5678)
assert list(u64("grid")[:6]) == [5, 1, 1, 2, 3, 4] and (u64("block")[0], u64("shared")[0]) == (128, 1024)
assert list(u64("offsets")[:3]) == [0, 128, 136] and u64("base")[0] % 64 == 0
raw = bytes((ctypes.c_ubyte * (8 * 512)).in_dll(fake, "bytes"))
assert struct.unpack_from("Qi", raw, 128) == (y.data_ptr(), 7) and raw[:128] == b"\xab" * 128
assert struct.unpack_from("QQ", raw, 512) == (out.data_ptr(), out.data_ptr() + 12)
assert var("replaced").value == 1 and (u64("maps")[0] - u64("base")[0], u64("maps")[1]) == (0, x.data_ptr())
wrapped = _replay.Body(ext, body, ())
assert wrapped(x[1:], y) is None and var("launches").value == 2  # not 16-byte aligned: nothing launched
var("result").value = 201  # CUDA_ERROR_INVALID_CONTEXT at the first launch: the Python path runs the call
assert wrapped(x, y) is None and var("launches").value == 2
var("result").value = 1
try:
    wrapped(x, y)
    raise AssertionError("no error raised")
except RuntimeError as exc:
    assert "cuLaunchKernel failed: CUDA error 1 (stand-in error)" in str(exc), exc
assert ext.take_error() == ""  # taken by the raise
print("ok")
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the real driver is here (the GPU tests launch through it)")
def test_extension_launches_through_the_driver(tmp_path):
    """In a process whose libcuda is a stand-in: each launch gets its copied parameter buffer (64-byte aligned) with
    this run's addresses in its pointer words and tensor maps, the grid, block and shared bytes registered, in order;
    nothing launches for a misaligned input or a thread without a context; another error is raised with its text."""
    source = tmp_path / "fake_libcuda.c"
    source.write_text(_FAKE_LIBCUDA)
    lib = tmp_path / "libcuda.so.1"
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib), str(source)], check=True)
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_FAKE_RUN), str(lib)], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
