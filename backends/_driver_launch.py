"""Launching a kept runner's kernel through the CUDA driver, without Triton's Python launcher: the parameters are
packed once into a buffer, and each launch writes only the tensors' addresses (and the TMA descriptors' bases) and
calls `cuLaunchKernel` through ctypes.

Why: Triton 3.6's launcher wraps its C launch in Python per call (a scratch-buffer closure; for a Gluon kernel, a
Python loop that turns each descriptor into a tensor map, its shape and strides), and its C part asks the driver
for each tensor's address (`cuPointerGetAttribute`). That cost 20-26 µs of host time per kept launch on the H200 host
(benchmarks/README.md, the host breakdown), the largest part of a tiny training call's launches.

`runner` builds one only where it launches exactly what Triton's launcher would: Triton 3.6 (whose launcher this
mirrors and was tested against; triton 3.8 rewrote it, and other versions launch through their own), its CUDA
launcher with no scratch buffers, no programmatic dependent launch, no cooperative grid, one CTA per cluster;
parameter types it knows (pointers, integers, fp32/fp64 scalars, TMA descriptors lowered to tensor maps); and a
parameter list whose sizes the driver confirms (`cuFuncGetParamInfo`). Anything else gets None, and Triton's
launcher serves.

The parameter list mirrors Triton 3.6's `make_launcher`: the signature's non-constexpr entries in order, a
descriptor expanded to its tensor map (encoded as `fill_tma_descriptor` encodes it), its shape (i32) and strides
(i64), then two null scratch pointers.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import struct
import threading
from typing import Any

import torch
import triton

log = logging.getLogger("attnhub")
MIRRORS_LAUNCHER = triton.__version__.split(".")[:2] == ["3", "6"]  # the Triton whose launcher `_build` mirrors

_SCALARS = {"i1": "b", "i8": "b", "i16": "h", "i32": "i", "i64": "q", "u1": "B", "u8": "B", "u16": "H", "u32": "I",
            "u64": "Q", "fp32": "f", "f32": "f", "fp64": "d"}
_MAP_BYTES, _MAP_ALIGN = 128, 64  # a CUtensorMap
_TMA_DTYPE_DEVICE_TO_HOST = {8: 10, 9: 8, 10: 9}  # as Triton's driver maps them; the rest are equal
_L2_PROMOTION_128B, _OOB_FILL_NAN = 2, 1
_NO_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT
_c_u64p, _c_u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)


class _Driver:
    """The libcuda entry points the runners call."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")  # CDLL: the interpreter lock is released during each call
        self.launch = lib.cuLaunchKernel
        self.launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        self.replace = lib.cuTensorMapReplaceAddress
        self.replace.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.encode = lib.cuTensorMapEncodeTiled
        self.encode.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, _c_u64p, _c_u64p,
                                _c_u32p, _c_u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.param_info = lib.cuFuncGetParamInfo  # CUDA 12.4+
        self.param_info.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                                    ctypes.POINTER(ctypes.c_size_t)]
        self.error_string = lib.cuGetErrorString
        self.error_string.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for fn in (self.launch, self.replace, self.encode, self.param_info, self.error_string):
            fn.restype = ctypes.c_int

    def check(self, result: int, what: str) -> None:
        if result != 0:
            text = ctypes.c_char_p()
            self.error_string(result, ctypes.byref(text))
            raise RuntimeError(f"attnhub: {what} failed: CUDA error {result} ({(text.value or b'?').decode()})")


@functools.lru_cache(maxsize=1)
def _get_driver() -> _Driver | None:
    """libcuda's entry points, loaded once; None without libcuda or with one older than CUDA 12.4."""
    try:
        return _Driver()
    except (OSError, AttributeError) as exc:
        log.info("attnhub: kernels launch through Triton's launcher (%s)", exc)
        return None


class _Params:
    """The parameter buffer of one runner: slots appended with natural alignment, tensor maps 64-byte aligned."""

    def __init__(self) -> None:
        self.layout: list[tuple[int, int]] = []  # (offset, size) per kernel parameter
        self.fills: list[tuple[int, str, Any]] = []  # (offset, struct format, value) written once
        self.size = 0

    def add(self, size: int, align: int) -> int:
        offset = -(-self.size // align) * align
        self.layout.append((offset, size))
        self.size = offset + size
        return offset

    def scalar(self, fmt: str, value) -> None:
        size = struct.calcsize(fmt)
        self.fills.append((self.add(size, size), fmt, value))


class Runner:
    """One kept runner's launch through the driver (`runner` builds it); `__call__` launches or returns False."""

    __slots__ = ("function", "block", "shared", "pointers", "maps", "buffer", "base", "params", "lock", "driver")

    def __call__(self, args: tuple, grid: tuple, stream: int) -> bool:
        """Launch with this call's tensors (args: the kernel's arguments without the constexpr tail, as at
        `runner`); False where a descriptor's shape or strides differ from the runner's (the caller then launches
        through Triton)."""
        driver = self.driver
        with self.lock:  # the buffer is shared: a launch on the engine's thread must not interleave with another
            u64 = self.buffer
            for slot, i in self.pointers:
                u64[slot] = args[i].data_ptr()
            for address, i, shape, strides in self.maps:
                desc = args[i]
                if not (desc.shape is shape or desc.shape == shape) or not (desc.strides is strides
                                                                           or desc.strides == strides):
                    return False
                driver.check(driver.replace(address, desc.base.data_ptr()), "cuTensorMapReplaceAddress")
            gx, gy, gz = (*grid, 1, 1)[:3]
            result = driver.launch(self.function, gx, gy, gz, self.block, 1, 1, self.shared, stream, self.params,
                                   None)
        if result == _NO_CONTEXT:  # a thread without a current context: Triton's launcher makes one current
            return False
        driver.check(result, "cuLaunchKernel")
        return True


def runner(compiled, args: tuple, tail: tuple) -> Runner | None:
    """A driver launch of `compiled` (a Triton CompiledKernel, launched once already) for calls whose arguments
    other than tensors and descriptors' bases are those of `args` (a kept runner's key fixes them); tail: the
    constexpr values after args. None where it cannot launch exactly as Triton would (the module docstring)."""
    driver = _get_driver() if MIRRORS_LAUNCHER else None
    if driver is None:
        return None
    try:
        return _build(driver, compiled, args, tail)
    except (AttributeError, TypeError, ValueError, KeyError, struct.error) as exc:  # a Triton whose internals differ
        log.info("attnhub: %s launches through Triton's launcher (%s)", getattr(compiled, "name", "?"), exc)
        return None


def _build(driver: _Driver, compiled, args: tuple, tail: tuple) -> Runner | None:
    launcher, meta = compiled.run, compiled.metadata
    if (type(launcher).__name__ != "CudaLauncher" or launcher.global_scratch_size or launcher.profile_scratch_size
            or launcher.launch_pdl or launcher.launch_cooperative_grid or launcher.num_ctas != 1):
        return None
    signature = list(compiled.src.signature.values())
    values = (*args, *tail)
    if len(signature) != len(values):
        return None
    desc_meta = list(getattr(meta, "tensordesc_meta", None) or ())
    params, pointers, maps = _Params(), [], []
    for i, (ty, value) in enumerate(zip(signature, values)):
        if ty == "constexpr":
            continue
        if not isinstance(ty, str):  # tuples of arguments
            return None
        if ty.startswith("*"):
            offset = params.add(8, 8)
            if isinstance(value, torch.Tensor):
                pointers.append((offset // 8, i))
            elif value is None or isinstance(value, int):
                params.fills.append((offset, "Q", value or 0))
            else:
                return None
        elif ty.startswith("tensordesc"):
            if not desc_meta or desc_meta[0] is None:  # not lowered to a tensor map
                return None
            maps.append((params.add(_MAP_BYTES, _MAP_ALIGN), i, desc_meta.pop(0), value))
            for size in value.shape:
                params.scalar("i", size)
            for stride in value.strides:
                params.scalar("q", stride)
        elif ty in _SCALARS:
            params.scalar(_SCALARS[ty], value)
        else:
            return None
    for _ in range(2):  # the global and profile scratch pointers: none
        params.fills.append((params.add(8, 8), "Q", 0))
    if desc_meta or not _confirmed(driver, compiled.function, params.layout):
        return None
    return _pack(driver, compiled, params, pointers, maps)


def _confirmed(driver: _Driver, function: int, layout: list) -> bool:
    """Whether the kernel's parameters are as many as in `layout` and of the same sizes (the driver's view)."""
    offset, size = ctypes.c_size_t(), ctypes.c_size_t()
    for i, (_, expected) in enumerate(layout):
        if driver.param_info(function, i, ctypes.byref(offset), ctypes.byref(size)) != 0 or size.value != expected:
            return False
    return driver.param_info(function, len(layout), ctypes.byref(offset), ctypes.byref(size)) != 0


def _pack(driver: _Driver, compiled, params: _Params, pointers: list, maps: list) -> Runner:
    words = -(-(params.size + _MAP_ALIGN) // 8)
    storage = (ctypes.c_uint64 * words)()
    start = ctypes.addressof(storage)
    base = -(-start // _MAP_ALIGN) * _MAP_ALIGN  # the buffer's 64-byte aligned start
    raw = (ctypes.c_char * (words * 8)).from_buffer(storage)
    for offset, fmt, value in params.fills:
        struct.pack_into(fmt, raw, base - start + offset, value)
    r = Runner()
    r.driver, r.lock = driver, threading.Lock()
    r.function, r.block, r.shared = compiled.function, 32 * compiled.metadata.num_warps, compiled.metadata.shared
    r.buffer = storage
    r.base = base
    r.pointers = tuple(((base - start) // 8 + slot, i) for slot, i in pointers)
    # the example's own shape and strides: a descriptor copied from the same checked one (`descriptor_maker`)
    # shares them, so the per-launch check is an identity test
    r.maps = tuple((base + offset, i, desc.shape, desc.strides) for offset, i, _, desc in maps)
    for offset, _, m, desc in maps:
        _encode(driver, base + offset, m, desc)
    r.params = (ctypes.c_void_p * len(params.layout))(*(base + offset for offset, _ in params.layout))
    return r


def _encode(driver: _Driver, address: int, meta: dict, desc) -> None:
    """The tensor map of `desc` (a host TMA descriptor) at `address`, as Triton's `fill_tma_descriptor` encodes it."""
    if meta.get("fp4_padded"):
        raise ValueError("fp4-padded descriptors")
    shape, strides, block = list(desc.shape), list(desc.strides), list(meta["block_size"])
    rank, elem = len(shape), meta["elem_size"]
    if strides[-1] != 1 or len(block) != rank:
        raise ValueError("descriptor layout")
    dims = (ctypes.c_uint64 * rank)(*reversed(shape))
    byte_strides = (ctypes.c_uint64 * rank)(*(elem * s for s in reversed(strides[:-1])), 0)
    boxes = (ctypes.c_uint32 * rank)(*reversed(block))
    ones = (ctypes.c_uint32 * rank)(*([1] * rank))
    dtype = _TMA_DTYPE_DEVICE_TO_HOST.get(meta["elem_type"], meta["elem_type"])
    fill = _OOB_FILL_NAN if getattr(desc, "padding", None) == "nan" else 0
    driver.check(driver.encode(address, dtype, rank, desc.base.data_ptr(), dims, byte_strides, boxes, ones, 0,
                               meta["swizzle"], _L2_PROMOTION_128B, fill), "cuTensorMapEncodeTiled")
