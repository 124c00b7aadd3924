"""triton_fa_rope forward paths: RoPE inside the attention kernel or K / q and K rotated first
(`_rotate_kernel`), and the narrow last K tile.

Each path is forced by editing the launcher's config (`prerotate_from_n`: (inference, training), `narrow_tail`) and
compared with `math` in float64: output without grad, output and dq, dk, dv with grad. Every `torch.empty` buffer
is filled with NaN first (conftest's `nan_empty`), so a kernel that leaves part of its output unwritten fails.
On CPU the interpreter runs them in float32 (blocks of 32: N = 71 and 65 leave 7 and 1 keys for the last tile);
with CUDA the compiled kernels in bfloat16 and float16.
"""

from __future__ import annotations

import pytest
import triton.runtime
import torch

from attnhub.backends import triton_fa_rope as T
from tests.backends.test_parity import DEVICE, TRITON, Shape, available, make_qkv, make_table, make_tensor, run_backend
from tests.tolerances import assert_close_rel

SHAPES = {
    "il_p1_7x10_d64": Shape(1, 2, (7, 10), 1, 64, "interleaved"),  # N = 71
    "half_p1_8x8_d32": Shape(2, 1, (8, 8), 1, 32, "half"),  # N = 65: a last tile of one key
    "il_p5_6x12_d48": Shape(1, 2, (6, 12), 5, 48, "interleaved"),  # HEAD_D != BLOCK_D: pair loads
    "perhead_il_p0_8x9_d32": Shape(1, 2, (8, 9), 0, 32, "interleaved", per_head=True),
    "norope_p1_7x10_d64": Shape(1, 2, (7, 10), 1, 64, None),
}
PATHS = {  # launcher config overrides
    "in_kernel": dict(prerotate_from_n=(None, None), narrow_tail=False),  # the default off Hopper
    "in_kernel_narrow_tail": dict(prerotate_from_n=(None, None), narrow_tail=True),
    "prerotate_narrow_tail": dict(prerotate_from_n=(0, 0), narrow_tail=True),
}
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]


def _case(shape_name: str, kind: str, seed: int, dtype: torch.dtype = DTYPES[0]):
    """-> (shape, generator, q, k, v, table) of SHAPES[shape_name], or a skip where triton_fa_rope cannot run it."""
    s = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(kind, s.B, s.H, s.N, s.D, dtype, gen)
    table = make_table(s, gen)
    why = available(TRITON, q, k, v, table)
    if why:
        pytest.skip(why)
    return s, gen, q, k, v, table


def _force_path(monkeypatch, path: str, q: torch.Tensor, meta_d: int) -> None:
    cfg = {**T._configs(q, meta_d), **PATHS[path]}
    monkeypatch.setattr(T, "_configs", lambda *_: cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_forward_paths_match_math(shape_name, path, dtype, monkeypatch, nan_empty):
    s, gen, q, k, v, table = _case(shape_name, "transposed", 21, dtype)
    do = make_tensor("contiguous", s.B, s.H, s.N, s.D, dtype, gen)
    _force_path(monkeypatch, path, q, T._meta(q, table)["BLOCK_D"])
    ref = run_backend("math", *(t.double() for t in (q, k, v, do)), table)
    got = run_backend(TRITON, q, k, v, do, table)
    for what, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        assert_close_rel(a, b, dtype, f"{path} {what}")
    with torch.no_grad():
        o = T.attention(q, k, v, table, s.D ** -0.5)
    assert_close_rel(o, ref[0], dtype, f"{path} inference o")


@pytest.mark.parametrize("n,block,expected", [(197, 64, 16), (192, 64, 64), (577, 64, 16), (100, 64, 64),
                                              (90, 64, 32), (71, 32, 8 * 2), (200, 128, 128), (1029, 128, 16)])
def test_tail_width(n, block, expected):
    """The last K tile: the remainder rounded up to a power of two, at least 16, at most the block."""
    assert T._tail(n, block) == expected


@pytest.mark.parametrize("n_rows,block,bh", [(197, 64, 3), (192, 64, 1), (1, 128, 7), (1029, 32, 70_400)])
def test_grid_counts_blocks_of_every_pair(n_rows, block, bh):
    assert T._grid(n_rows, block, bh) == -(-n_rows // block) * bh == ((n_rows + block - 1) // block) * bh


def test_grid_beyond_the_launch_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="launch-grid limit"):
        T._grid(2**20, 1, 2**12)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_prerotate_from_n_is_a_sequence_length_threshold(training, monkeypatch):
    """K (and q in training) go through `_rotate_kernel` exactly when N >= the config's threshold for the pass."""
    s, _, q, k, v, table = _case("il_p1_7x10_d64", "contiguous", 3)
    launched = []
    launch = T._launch
    monkeypatch.setattr(T, "_launch", lambda kernel, *a, **kw: (launched.append(kernel), launch(kernel, *a, **kw)))
    block_d = T._meta(q, table)["BLOCK_D"]
    for from_n, rotations in ((s.N, 2 if training else 1), (s.N + 1, 0)):
        threshold = (None, from_n) if training else (from_n, None)
        cfg = {**T._configs(q, block_d), "prerotate_from_n": threshold}
        monkeypatch.setattr(T, "_configs", lambda *_: cfg)
        launched.clear()
        T._forward(q, k, v, table, s.D ** -0.5, training)
        assert launched.count(T._rotate_kernel) == rotations, (from_n, launched)
        assert launched[-1] is T._fwd_kernel


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


def test_launcher_keeps_compiled_kernels_per_specialization(monkeypatch):
    """`_launch` compiles through `kernel[grid]` once per set of facts Triton specializes on, then calls the
    compiled kernel with the run-time arguments and the constexprs in signature order."""
    kernel = _FakeKernel()
    monkeypatch.setattr(T, "_CACHED_RUNNERS", True)
    monkeypatch.setattr(T, "_RUNNERS", {})
    x = torch.zeros(64)

    def launch(t, n=7, s=0.5, B=2):
        T._launch(kernel, (3,), (t, n, s), 4, 2, B=B, A=1)  # constexprs passed out of signature order

    launch(x)
    assert len(kernel.jit_calls) == 1 and not kernel.runner_calls
    launch(x)
    assert len(kernel.jit_calls) == 1
    assert kernel.runner_calls == [((3, 1, 1), (x, 7, 0.5, 1, 2))]  # A, B appended in signature order
    launch(torch.nn.Parameter(x.clone()))  # another tensor (a subclass, too) of the same facts: no new entry
    assert len(kernel.jit_calls) == 1 and len(T._RUNNERS) == 1 and len(kernel.runner_calls) == 2
    kernel.runner_calls.pop()
    # every fact Triton specializes on makes a new entry: alignment, dtype, scalar value and type, constexpr
    for i, variant in enumerate([x[1:], x.half(), dict(n=16), dict(n=7.0), dict(s=7.5), dict(B=3)], start=2):
        launch(variant) if isinstance(variant, torch.Tensor) else launch(x, **variant)
        assert len(kernel.jit_calls) == i and len(T._RUNNERS) == i
    assert len(kernel.runner_calls) == 1


def test_launcher_without_kept_kernels_calls_triton_every_time(monkeypatch):
    kernel = _FakeKernel()
    monkeypatch.setattr(T, "_CACHED_RUNNERS", False)
    for _ in range(2):
        T._launch(kernel, (3,), (torch.zeros(4), 1, 0.5), 4, 2, A=1, B=2)
    assert len(kernel.jit_calls) == 2 and not kernel.runner_calls


def _launch_signature(kernel, grid, args, num_warps, num_stages, **constexprs):
    """What a launch compiles from: the kernel, its options, and each argument's dtype, shape and strides (tensors)
    or value (scalars)."""
    return (kernel, grid, num_warps, num_stages, tuple(sorted(constexprs.items())),
            tuple((a.dtype, tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.parametrize("shape_name", ["il_p1_7x10_d64", "half_p1_8x8_d32", "norope_p1_7x10_d64"])
def test_compile_ahead_plans_the_launches_of_a_training_call(shape_name, monkeypatch):
    """`_compile_ahead` compiles exactly what the forward and backward of a training call then launch (the upstream
    gradient in o's layout), once per key."""
    s, _, q, k, v, table = _case(shape_name, "fused", 5)
    monkeypatch.setattr(T, "_AHEAD_DONE", set())
    monkeypatch.setattr(T, "_COMPILE_AHEAD", False)  # the real call below must not plan on its own
    planned, launched = [], []
    monkeypatch.setattr(T, "_compile_only", lambda *a, **kw: planned.append(_launch_signature(*a, **kw)))
    T._compile_ahead(q, k, v, table, s.D ** -0.5)
    T._compile_ahead(q, k, v, table, s.D ** -0.5)  # the same key: nothing more
    launch = T._launch
    monkeypatch.setattr(T, "_launch", lambda *a, **kw: (launched.append(_launch_signature(*a, **kw)), launch(*a, **kw)))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    o = T.attention(qg, kg, vg, table, s.D ** -0.5)
    o.backward(torch.randn_like(o))
    assert planned == launched and len(planned) >= 4  # forward, delta, dk/dv, dq at least


def test_compile_ahead_failure_warns_and_leaves_no_async_mode(monkeypatch, caplog):
    s, _, q, k, v, table = _case("il_p1_7x10_d64", "contiguous", 6)
    monkeypatch.setattr(T, "_AHEAD_DONE", set())

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(T, "_compile_only", broken)
    with caplog.at_level("WARNING", logger=T.log.name):
        T._compile_ahead(q, k, v, table, s.D ** -0.5)
    assert "compiling ahead failed (RuntimeError: no compiler here)" in caplog.text
    from triton.runtime import _async_compile

    assert _async_compile.active_mode.get() is None  # later compiles are not left in async mode


def test_compile_ahead_builds_the_launchers_of_what_it_compiled(monkeypatch):
    """After compiling, `_compile_ahead` builds the C launcher of every planned kernel not yet loaded, in the pool."""
    s, _, q, k, v, table = _case("il_p1_7x10_d64", "contiguous", 7)
    monkeypatch.setattr(T, "_AHEAD_DONE", set())

    class Compiled:
        def __init__(self, name, module=None):
            self.src, self.metadata, self.module = f"src {name}", f"meta {name}", module

    planned = []
    monkeypatch.setattr(T, "_compile_only", lambda kernel, *a, **kw: planned.append(kernel) or Compiled(
        kernel.fn.__name__, module="loaded" if kernel is T._bwd_preprocess else None))
    built = []

    class Driver:  # triton.runtime.driver: `active.launcher_cls(src, metadata)` builds a launcher
        class active:
            @staticmethod
            def launcher_cls(src, metadata):
                built.append((src, metadata))

    monkeypatch.setattr(triton.runtime, "driver", Driver)
    T._compile_ahead(q, k, v, table, s.D ** -0.5)
    expected = [(f"src {kernel.fn.__name__}", f"meta {kernel.fn.__name__}") for kernel in planned
                if kernel is not T._bwd_preprocess]  # an already loaded kernel has its launcher
    assert sorted(built) == sorted(expected) and len(built) == len(planned) - 1


@pytest.mark.parametrize("value,on", [(None, True), ("", True), ("1", True), ("0", False)])
def test_compile_ahead_env_values(value, on):
    assert T._compile_ahead_switch(value) is on


@pytest.mark.parametrize("value", ["yes", "true", " 1", "2"])
def test_compile_ahead_env_invalid_value_raises(value):
    with pytest.raises(ValueError, match=r"ATTNHUB_TRITON_COMPILE_AHEAD=.*expected 0 or 1"):
        T._compile_ahead_switch(value)
