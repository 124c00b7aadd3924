"""`triton_fa_rope.replay`: on the CPU (interpreter), the dry runs a replay is built from read only tensors its
bodies hold and write every tensor they allocate, and whole replayed calls through a stand-in body (the recorded
kernels run in the interpreter with each run's tensors in their slots) give the Python path's bits; on the GPU,
cached eager training calls replayed from C++ give the Python path's bits (outputs poisoned before the kernels write
them), agree with float64 math, and fall back to the Python path where they cannot replay (a gradient laid out
otherwise, an input not 16-byte aligned, a learnable table, launches recorded)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import attnhub
from attnhub import settings
from attnhub.backends import _driver_launch as dl
from attnhub.backends import _replay
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import configs, replay
from tests.helpers import DEVICE, Shape, assert_close_rel, make_learnable_table, make_table

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
REPLAYED, PYTHON = "ReplayedAttentionBackward", "FlashRopeAttentionBackward"
PACKED_REPLAYED, PACKED_PYTHON = "ReplayedAttentionPackedBackward", "FlashRopeAttentionPackedBackward"


@pytest.fixture
def replayable():
    if not runtime.KEEPS_RUNNERS or not dl.MIRRORS_LAUNCHER or dl._get_driver() is None:
        pytest.skip("no kept runners, or no driver launches (Triton other than 3.6, no CUDA 12.4 driver)")
    _replay.extension()
    assert _replay.wait(600), "the replay extension did not build (see the log)"
    with settings.override(background_compile=False, triton_replay=True), runtime.fresh_caches():
        yield


def _inputs(B, H, grid, P, dtype, layout, per_head=False, kv_heads=None):
    """q, k, v: views of one projection qkv [B, N, 3, H, D] (k, v: their first kv_heads heads), do laid out like o
    ([B, N, H, D]), the table."""
    shape = Shape(B, H, grid, P, 64, layout, per_head)
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, shape.N, 3, H, shape.D, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    do = torch.randn(B, shape.N, H, shape.D, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return q, k, v, do, make_table(shape, gen)


def _step(q, k, v, do, table):
    """-> the autograd node's name, [o, dq, dk, dv]; q, k, v as given (views, strides, offsets kept)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = attnhub.attention(q, k, v, table, backend="triton_fa_rope")
    name = type(o.grad_fn).__name__
    o.backward(do)
    return name, [o.detach(), q.grad, k.grad, v.grad]


def _step_packed(q, k, v, do, table):
    """`_step` through `attention_packed` of the projection q, k, v are the views of (`_inputs`): the gradient
    written whole, then split as [dq, dk, dv]."""
    qkv = q.as_strided((q.shape[0], q.shape[2], 3, q.shape[1], q.shape[3]), (q.stride(0), q.stride(2),
                                                                           q.shape[1] * q.shape[3], q.stride(1), 1))
    qkv = qkv.detach().requires_grad_()
    o = attnhub.attention_packed(qkv, table, backend="triton_fa_rope")
    name = type(o.grad_fn).__name__
    o.backward(do)
    return name, [o.detach(), *qkv.grad.permute(2, 0, 3, 1, 4).unbind(0)]


def _math(q, k, v, do, table):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    o = attnhub.attention(q, k, v, table, backend="math")
    o.backward(do.double())
    return [o.detach(), q.grad, k.grad, v.grad]


CASES = {
    "tiny": ((1, 1, (4, 4), 1, torch.bfloat16, "interleaved"), "auto"),  # resident forward, one-block backward
    "no rope": ((2, 3, (8, 8), 0, torch.float16, None), "auto"),
    "N=197 fused": ((1, 2, (14, 14), 1, torch.bfloat16, "interleaved"), "fused"),  # dq in fp32 scratch
    "N=197 split": ((1, 2, (14, 14), 1, torch.bfloat16, "interleaved"), "split"),  # Triton's split kernels
    "N=257": ((1, 2, (16, 16), 1, torch.bfloat16, "interleaved"), "auto"),  # on Hopper the Gluon backward's
    "grouped heads": ((1, 4, (8, 8), 1, torch.bfloat16, "interleaved", False, 2), "auto"),  # the split backward
    "fp32 half": ((1, 2, (4, 4), 1, torch.float32, "half"), "auto"),  # the Triton forward
    "per head": ((2, 2, (4, 4), 5, torch.bfloat16, "interleaved", True), "auto"),
}


@pytest.mark.parametrize("packed", [False, True], ids=["views", "packed"])
@pytest.mark.parametrize("case", CASES)
def test_dry_runs_read_only_what_the_bodies_hold(case, packed, monkeypatch):
    """The launches `replay._build` records (nothing runs): every tensor one reads (a pointer, a descriptor's base)
    is an input, an allocation or a constant of its body (packed: dq, dk, dv are views into the one allocated
    gradient), and every allocation is some launch's argument (none is computed by PyTorch, which a body would not
    replay): what `_replay.body` maps, checked here on the kernels the CPU records (the Triton forward; the fused
    and split backwards)."""
    made = []
    def body(launches, inputs, returned, scratch=(), constants=()):
        made.append((launches, inputs, returned, scratch, constants))
        return object()

    monkeypatch.setattr(_replay, "body", body)
    args, bwd = CASES[case]
    if _kind(args, packed) is None:
        pytest.skip("grouped heads: no one projection")
    q, k, v, _, table = _inputs(*args)
    B, H, N, D = q.shape
    cos_sin = (None, None) if table is None else table.cos_sin()
    with settings.override(triton_bwd=bwd), runtime.fresh_caches(keep_runners=False):
        call = replay._build(q, k, v, *cos_sin, table, D ** -0.5, configs.for_call(q.device, D),
                             torch.Size((B, N, 3, H, D)) if packed else None)
    assert call is not None and len(made) == 2
    for launches, inputs, returned, scratch, constants in made:
        held = {t.data_ptr() for t in (*inputs, *returned, *scratch, *constants)}
        read = [getattr(a, "base", a) for r in launches for a in r.args]
        read = {t.data_ptr() if t.data_ptr() in held else t.untyped_storage().data_ptr() for t in read
                if isinstance(t, torch.Tensor)}  # a view into an allocation: its storage's address
        assert launches and read <= held
        assert {t.data_ptr() for t in (*returned, *scratch)} <= read


class _InterpretedBody:
    """A stand-in for `_replay.body` on the CPU: maps each recorded launch's tensors to slots by address, as the
    built one does, and per run allocates NaN-filled outputs and scratch and runs the recorded kernels (the Triton
    interpreter) with this run's tensors in their slots."""

    def __init__(self, launches, inputs, returned, scratch=(), constants=()):
        allocated = (*returned, *scratch)
        slots = (*inputs, *allocated, *constants)
        slot_of = {t.data_ptr(): i for i, t in enumerate(slots)}
        assert len(slot_of) == len(slots)
        self.inputs, self.returned, self.constants = len(inputs), len(returned), constants
        self.layouts = [(t.shape, t.stride(), t.dtype) for t in allocated]
        views = {}  # an argument inside an allocation (a packed gradient's dk): (slot, its view's layout)
        for r in launches:
            for a in r.args:
                if isinstance(a, torch.Tensor) and a.data_ptr() not in slot_of:
                    i = next(len(inputs) + j for j, t in enumerate(allocated) if a.untyped_storage().data_ptr()
                             == t.untyped_storage().data_ptr())
                    views[a.data_ptr()] = (i, a.shape, a.stride(), a.storage_offset())
        self.launches = [(r, [slot_of.get(a.data_ptr(), views.get(a.data_ptr())) if isinstance(a, torch.Tensor)
                              else None for a in r.args]) for r in launches]

    def __call__(self, *inputs):
        allocated = [torch.empty_strided(shape, stride, dtype=dtype).fill_(float("nan"))
                     for shape, stride, dtype in self.layouts]
        slots = (*inputs, *allocated, *self.constants)
        for r, where in self.launches:
            args = [a if i is None else slots[i] if isinstance(i, int) else slots[i[0]].as_strided(*i[1:])
                    for a, i in zip(r.args, where)]
            r.kernel[r.grid](*args, num_warps=r.num_warps, num_stages=r.num_stages, **r.constexprs)
        return list(slots[self.inputs:self.inputs + self.returned])


@pytest.fixture
def interpreted(monkeypatch):
    """Replays on the CPU through `_InterpretedBody` (the built extension's launches are tested in
    tests/backends/test_replay.py)."""
    if torch.cuda.is_available():
        pytest.skip("the GPU tests replay through the extension")
    calls: dict = {}
    monkeypatch.setattr(replay, "DEVICE_TYPE", "cpu")
    monkeypatch.setattr(_replay, "extension", lambda: _replay)
    monkeypatch.setattr(_replay, "body", _InterpretedBody)
    monkeypatch.setattr(runtime, "replay_cache", lambda: calls)
    with settings.override(triton_replay=True), runtime.fresh_caches(keep_runners=False):
        yield calls


CPU_CASES = {**{name: case for name, case in CASES.items() if Shape(*case[0][:4], 64, None).N <= 65},
             "N=37 fused": ((1, 2, (6, 6), 1, torch.float32, "interleaved"), "fused")}  # dq in fp32 scratch


def _kind(args, packed: bool):
    """-> the step, the Python path's node name, the replayed one's; None for grouped heads packed (no projection)."""
    if packed and len(args) > 7:
        return None
    return (_step_packed, PACKED_PYTHON, PACKED_REPLAYED) if packed else (_step, PYTHON, REPLAYED)


@pytest.mark.parametrize("packed", [False, True], ids=["views", "packed"])
@pytest.mark.parametrize("case", CPU_CASES)
def test_replayed_calls_give_the_python_paths_bits_on_the_cpu(case, packed, interpreted):
    """The whole replay (lookup, the dry runs, `ReplayedAttention`'s forward and backward; packed,
    `ReplayedAttentionPacked` writing the projection's gradient whole) through the stand-in body: from a signature's
    second call on the node is the replayed one, and its o, dq, dk, dv are the Python path's bit for bit, its
    outputs NaN-filled before the kernels write them; a gradient laid out otherwise than o runs the Python backward
    in the replayed node."""
    args, bwd = CPU_CASES[case]
    if _kind(args, packed) is None:
        pytest.skip("grouped heads: no one projection")
    step, python, replayed = _kind(args, packed)
    q, k, v, do, table = _inputs(*args)
    with settings.override(triton_bwd=bwd):
        with settings.override(triton_replay=False):
            name, ref = step(q, k, v, do, table)
        assert name == python
        got = [step(q, k, v, do, table) for _ in range(3)]
        other = step(q, k, v, do.contiguous(), table)
        with settings.override(triton_replay=False):
            other_ref = step(q, k, v, do.contiguous(), table)[1]
    assert [name for name, _ in got] == [python, replayed, replayed] and other[0] == replayed
    assert len(interpreted) == 1
    for results, expected in ((got[1][1], ref), (got[2][1], ref), (other[1], other_ref)):
        for what, a, b in zip(("o", "dq", "dk", "dv"), results, expected):
            assert torch.equal(a, b), what


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["views", "packed"])
@pytest.mark.parametrize("case", CASES)
def test_replay_gives_the_python_paths_bits(case, packed, replayable):
    """Four calls with the Python path, then four replayed (the first of a signature runs its Python path, the
    second builds the bodies): from then on the node is the replayed one and its o, dq, dk, dv are the Python
    path's bit for bit (packed: the projection's gradient, written whole), and within the float64 bound, with every
    new allocation NaN-filled (deterministic mode)."""
    args, bwd = CASES[case]
    if _kind(args, packed) is None:
        pytest.skip("grouped heads: no one projection")
    _check_replay(args, bwd, packed)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["views", "packed"])
@pytest.mark.parametrize("grid,P", [((24, 24), 1), ((32, 32), 5)], ids=["N=577", "N=1029"])
def test_replay_of_the_training_forward_after_the_rotation_pass(grid, P, packed, replayable):
    """`gluon_prerotate_train_from_n`: the replayed forward body (rotate_kernel, then the Gluon forward without RoPE
    on the rotated pair, the TMA descriptors' bases in the pass's outputs) gives the Python path's bits."""
    with configs.override(gluon_prerotate_train_from_n=0):
        _check_replay((2, 2, grid, P, torch.bfloat16, "interleaved"), "auto", packed)


def _check_replay(args, bwd: str, packed: bool):
    """`test_replay_gives_the_python_paths_bits` of one case."""
    step, python, replayed = _kind(args, packed)
    q, k, v, do, table = _inputs(*args)
    with settings.override(triton_bwd=bwd), _poisoned():
        with settings.override(triton_replay=False):
            names, ref = zip(*(step(q, k, v, do, table) for _ in range(4)))
        assert set(names) == {python}
        got = [step(q, k, v, do, table) for _ in range(4)]
    assert [name for name, _ in got] == [python, replayed, replayed, replayed]
    for _, results in got[1:]:
        for what, a, b in zip(("o", "dq", "dk", "dv"), results, ref[-1]):
            assert torch.equal(a, b), what
    for what, a, b in zip(("o", "dq", "dk", "dv"), got[-1][1], _math(q, k, v, do, table)):
        assert_close_rel(a, b, args[4], what, grad=what != "o")


@contextlib.contextmanager
def _poisoned():
    """Every allocation NaN-filled (`torch.utils.deterministic.fill_uninitialized_memory`, C++ ones included)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@gpu
@pytest.mark.gpu
def test_falls_back_where_it_cannot_replay(replayable):
    """A gradient laid out otherwise than o, and an input not 16-byte aligned, run the Python path's launches in the
    replayed node: the Python path's bits. A learnable table and recorded launches take the Python path's node."""
    q, k, v, do, table = _inputs(2, 2, (4, 4), 1, torch.bfloat16, "interleaved")
    other_do = do.contiguous()  # [B, H, N, D]: o is [B, N, H, D] in memory
    buf = torch.empty(q.numel() + 8, device="cuda", dtype=q.dtype)
    misaligned = buf[1:1 + q.numel()].view(q.shape)
    misaligned.copy_(q)
    assert misaligned.stride() == q.contiguous().stride() and misaligned.data_ptr() % 16 != 0
    qc = q.contiguous()
    for inputs in ((q, k, v, other_do, table), (qc, k, v, do, table), (misaligned, k, v, do, table)):
        with settings.override(triton_replay=False):
            ref = _step(*inputs)[1]
        for _ in range(3):  # builds with aligned inputs and a gradient laid out like o (the kernels the body keeps)
            _step(*((qc if t is misaligned else do if t is other_do else t) for t in inputs))
        name, got = _step(*inputs)
        assert name == REPLAYED
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
    _, learnable = make_learnable_table(Shape(2, 2, (4, 4), 1, 64, "interleaved"), torch.Generator(), torch.float32)
    assert {_step(q, k, v, do, learnable)[0] for _ in range(3)} == {PYTHON}
    for _ in range(3):
        _step(q, k, v, do, table)
    with runtime.recording() as launches:
        assert _step(q, k, v, do, table)[0] == PYTHON
    assert launches


@gpu
@pytest.mark.gpu
def test_bodies_released_with_their_cache(replayable):
    q, k, v, do, table = _inputs(1, 1, (4, 4), 1, torch.bfloat16, "interleaved")
    ext = _replay.extension()
    before = ext.count()
    with runtime.fresh_caches():
        for _ in range(3):
            _step(q, k, v, do, table)
        assert ext.count() == before + 2  # its forward and backward
    assert ext.count() == before
