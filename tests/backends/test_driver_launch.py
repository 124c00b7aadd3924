"""`backends/_driver_launch`: a kept runner's parameters packed as Triton 3.6's launcher passes them (CPU, with a
stand-in compiled kernel and driver), and on a GPU the same bits as Triton's launcher through the whole backend."""

from __future__ import annotations

import ctypes
import struct
import types

import pytest
import torch

import attnhub
from attnhub import settings
from attnhub.backends import _driver_launch as dl
from attnhub.backends import _triton_runtime as runtime
from tests.helpers import assert_close_rel


class CudaLauncher:  # the class name `runner` accepts: Triton's
    global_scratch_size = profile_scratch_size = 0
    launch_pdl = launch_cooperative_grid = False
    num_ctas = 1


class _FakeDriver:
    """Records tensor-map encodes and answers `cuFuncGetParamInfo` from a list of parameter sizes."""

    def __init__(self, sizes):
        self.sizes, self.encoded = sizes, []

    def param_info(self, function, i, offset, size):
        if i >= len(self.sizes):
            return 1  # CUDA_ERROR_INVALID_VALUE
        size._obj.value = self.sizes[i]
        return 0

    def encode(self, address, dtype, rank, base, dims, strides, boxes, ones, interleave, swizzle, l2, fill):
        self.encoded.append((address % 64, dtype, rank, base, list(dims), list(strides)[:rank - 1], list(boxes),
                             swizzle, l2, fill))
        return 0

    def check(self, result, what):
        assert result == 0, what


def _compiled(signature: dict, launcher=None, tensordesc_meta=None):
    return types.SimpleNamespace(run=launcher or CudaLauncher(), src=types.SimpleNamespace(signature=signature),
                                 metadata=types.SimpleNamespace(num_warps=4, shared=1024,
                                                                tensordesc_meta=tensordesc_meta),
                                 function=0x1234, name="k")


class _Desc:
    def __init__(self, base, shape, strides, padding="zero"):
        self.base, self.shape, self.strides, self.padding = base, shape, strides, padding


def _bytes(r: dl.Runner, offset: int, fmt: str):
    return struct.unpack_from(fmt, (ctypes.c_char * (offset + 8)).from_address(r.base), offset)[0]


def test_parameters_packed_in_signature_order_without_constexprs():
    x, y = torch.zeros(4), torch.zeros(8)
    sig = {"X": "*fp32", "n": "i32", "Y": "*fp32", "s": "fp32", "big": "i64", "flag": "i1", "C": "constexpr"}
    # pointer 8 @0, i32 4 @8, pointer 8 @16, fp32 4 @24, i64 8 @32, i1 1 @40, two scratch pointers @48, @56
    driver = _FakeDriver([8, 4, 8, 4, 8, 1, 8, 8])
    r = dl._build(driver, _compiled(sig), (x, 7, y, 0.5, 2 ** 40, True), (64,))
    assert r is not None and r.block == 128 and r.shared == 1024 and r.function == 0x1234
    assert [ctypes.cast(r.params, ctypes.POINTER(ctypes.c_void_p))[i] - r.base for i in range(8)] == \
        [0, 8, 16, 24, 32, 40, 48, 56]
    assert (_bytes(r, 8, "i"), _bytes(r, 24, "f"), _bytes(r, 32, "q"), _bytes(r, 40, "b")) == (7, 0.5, 2 ** 40, 1)
    assert _bytes(r, 48, "Q") == _bytes(r, 56, "Q") == 0  # no scratch
    # the tensors' slots: written per launch (here by hand, as __call__ does before launching)
    u64 = r.buffer
    for slot, i in r.pointers:
        u64[slot] = (x, 7, y)[i].data_ptr()
    assert (_bytes(r, 0, "Q"), _bytes(r, 16, "Q")) == (x.data_ptr(), y.data_ptr())


def test_descriptor_expands_to_tensor_map_shape_and_strides():
    base = torch.zeros(64, 64, dtype=torch.bfloat16)
    desc = _Desc(base, [2, 64, 64], [4096, 64, 1])
    meta = [dict(swizzle=3, elem_size=2, elem_type=10, block_size=[1, 64, 64], fp4_padded=False)]
    sig = {"D": "tensordesc<bf16[1,64,64]>", "L": "*fp32"}
    # map 128 @0, shape 3 x i32 @128, strides 3 x i64 @144, pointer @168, scratch @176, @184
    driver = _FakeDriver([128, 4, 4, 4, 8, 8, 8, 8, 8, 8])
    r = dl._build(driver, _compiled(sig, tensordesc_meta=meta), (desc, torch.zeros(2)), ())
    assert r is not None and r.base % 64 == 0
    assert [_bytes(r, 128 + 4 * i, "i") for i in range(3)] == [2, 64, 64]
    assert [_bytes(r, 144 + 8 * i, "q") for i in range(3)] == [4096, 64, 1]
    (enc,) = driver.encoded  # as fill_tma_descriptor: innermost first, byte strides, device dtype 10 -> host 9
    assert enc == (0, 9, 3, base.data_ptr(), [64, 64, 2], [128, 8192], [64, 64, 1], 3, 2, 0)


@pytest.mark.parametrize("case", ["pdl", "scratch", "clusters", "tuple", "unknown type", "unlowered descriptor",
                                  "driver disagrees"])
def test_runner_refuses_what_it_cannot_launch_exactly(case):
    launcher, sig, args, meta = CudaLauncher(), {"X": "*fp32", "n": "i32"}, (torch.zeros(1), 3), None
    sizes = [8, 4, 8, 8]
    if case == "pdl":
        launcher.launch_pdl = True
    elif case == "scratch":
        launcher.global_scratch_size = 16
    elif case == "clusters":
        launcher.num_ctas = 2
    elif case == "tuple":
        sig = {"X": "*fp32", "n": ("i32", "i32")}
    elif case == "unknown type":
        sig = {"X": "*fp32", "n": "bf16"}
    elif case == "unlowered descriptor":
        sig, meta = {"D": "tensordesc<bf16[64,64]>", "n": "i32"}, [None]
        args = (_Desc(torch.zeros(4), [64, 64], [64, 1]), 3)
    elif case == "driver disagrees":
        sizes = [8, 8, 8, 8]
    assert dl._build(_FakeDriver(sizes), _compiled(sig, launcher, meta), args, ()) is None


def test_launch_writes_this_calls_addresses_and_falls_back_on_another_descriptor_layout():
    """`Runner.__call__`: each tensor's address into its slot and each descriptor's base into its tensor map, then one
    launch with the grid padded to three axes; False (no launch) for a descriptor of other strides."""
    meta = [dict(swizzle=3, elem_size=2, elem_type=10, block_size=[64, 64], fp4_padded=False)]
    example = _Desc(torch.zeros(64, 64, dtype=torch.bfloat16), [64, 64], [64, 1])
    driver = _FakeDriver([128, 4, 4, 8, 8, 8, 8, 8])
    r = dl._build(driver, _compiled({"D": "tensordesc<bf16[64,64]>", "X": "*fp32"}, tensordesc_meta=meta),
                  (example, torch.zeros(2)), ())
    calls = []
    r.driver = types.SimpleNamespace(
        replace=lambda address, base: calls.append(("replace", address - r.base, base)) or 0,
        launch=lambda *args: calls.append(("launch", *args[1:7])) or 0, check=driver.check)
    x, other = torch.zeros(3), _Desc(torch.zeros(64, 64, dtype=torch.bfloat16), example.shape, example.strides)
    assert r((other, x), (5,), 0)
    assert calls == [("replace", 0, other.base.data_ptr()), ("launch", 5, 1, 1, 128, 1, 1)]
    assert _bytes(r, 152, "Q") == x.data_ptr()  # map @0, shape @128, strides @136, X @152
    calls.clear()
    assert not r((_Desc(other.base, [64, 64], [128, 1]), x), (5,), 0) and not calls


def test_runner_only_for_the_triton_whose_launcher_it_mirrors(monkeypatch):
    monkeypatch.setattr(dl, "_get_driver", lambda: _FakeDriver([8, 4, 8, 8]))
    compiled, args = _compiled({"X": "*fp32", "n": "i32"}), (torch.zeros(1), 3)
    monkeypatch.setattr(dl, "MIRRORS_LAUNCHER", True)
    assert dl.runner(compiled, args, ()) is not None
    monkeypatch.setattr(dl, "MIRRORS_LAUNCHER", False)
    assert dl.runner(compiled, args, ()) is None


def test_runner_needs_the_driver_to_confirm_the_count():
    sig = {"X": "*fp32", "n": "i32"}
    assert dl._build(_FakeDriver([8, 4, 8, 8, 4]), _compiled(sig), (torch.zeros(1), 3), ()) is None
    assert dl._build(_FakeDriver([8, 4, 8]), _compiled(sig), (torch.zeros(1), 3), ()) is None


def _fwd_bwd(q, k, v, do, table, backend="triton_fa_rope"):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = attnhub.attention(q, k, v, table, backend=backend)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,H,grid,P,bwd", [
    (2, 6, (14, 14), 1, "auto"),  # the resident Gluon forward, the fused backward
    (1, 2, (4, 4), 1, "auto"),  # the tiny training call
    (2, 3, (24, 24), 1, "auto"),  # the long Gluon forward, the Gluon backward kernels
    (2, 3, (14, 14), 1, "split"),  # the Triton backward kernels
    (1, 2, (32, 32), 5, "auto"),  # the streaming Gluon forward
])
def test_driver_launches_give_tritons_bits(B, H, grid, P, bwd):
    """Three calls each with fresh caches (kept runners launch from the second call on), through Triton's launcher
    and through the driver: the same bits, a driver launch built for every kept runner, and the result against
    float64 math."""
    if not runtime.KEEPS_RUNNERS or not dl.MIRRORS_LAUNCHER or dl._get_driver() is None:
        pytest.skip("no kept runners, a Triton whose launcher the driver launch does not mirror, or no CUDA 12.4 "
                    "driver")
    N, D = P + grid[0] * grid[1], 64
    table = attnhub.CosSinTable(grid=grid, head_dim=D, prefix_tokens=P, device="cuda")
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    results = {}
    for launcher in ("triton", "driver"):
        with settings.override(triton_launcher=launcher, triton_bwd=bwd, background_compile=False), \
                runtime.fresh_caches() as state:
            for _ in range(3):
                results[launcher] = [t.clone() for t in _fwd_bwd(q, k, v, do, table)]
            without = [compiled.name for compiled, _, driver in state.runners.values() if driver is None]
        assert state.runners and len(without) == (len(state.runners) if launcher == "triton" else 0), without
    for a, b in zip(results["triton"], results["driver"]):
        assert torch.equal(a, b)
    ref = _fwd_bwd(*(t.double() for t in (q, k, v, do)), table, backend="math")
    for what, a, b in zip(("o", "dq", "dk", "dv"), results["driver"], ref):
        assert_close_rel(a, b, torch.bfloat16, what)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_map_bytes_equal_tritons():
    """The tensor map `_encode` writes is byte for byte the one Triton's `fill_tma_descriptor` makes."""
    from triton.backends.nvidia.driver import make_tensordesc_arg

    if dl._get_driver() is None:
        pytest.skip("no CUDA 12.4 driver")
    base = torch.zeros(3, 200, 64, device="cuda", dtype=torch.bfloat16)
    desc = _Desc(base, [3, 200, 64], [200 * 64, 64, 1])
    meta = dict(swizzle=3, elem_size=2, elem_type=10, block_size=[1, 64, 64], fp4_padded=False)
    theirs = make_tensordesc_arg(desc, meta)[0]
    buf = (ctypes.c_uint64 * 32)()
    address = -(-ctypes.addressof(buf) // 64) * 64
    dl._encode(dl._get_driver(), address, meta, desc)
    mine = ctypes.string_at(address, 128)
    # Triton's object (PyCUtensorMapObject, 128-byte aligned) keeps the map 128 bytes past its start
    assert mine == ctypes.string_at(id(theirs) + 128, 128)
