"""Host time of one attention call on the GPU machine: where a cached call's microseconds go.

    python benchmarks/host_profile.py [--sections paths,breakdown]

`paths`: inference at ViT-S/16 (B = 256: the device is busy; B = 4: it idles, so the loop measures the host), per call:
host µs (the loop's enqueue time) and wall µs, for triton_fa_rope (the Gluon forward, kept runners and Triton's own
`kernel[grid]` launch), triton_rope_sdpa, the automatic choice and F.sdpa without RoPE, two rounds each; then a
cProfile of 500 triton_fa_rope calls. Training at the tiny shape (1, 1, 17, 64): host µs per fwd+bwd against
F.sdpa's, and a cProfile of 500 triton_fa_rope steps.

`breakdown`: host µs per call piece by piece (best of 3 loops): the ViT-S/16 inference call (B = 256) through
`attnhub.attention`, the backend's entry, `launch.forward` and the launch alone; then at the tiny shape fwd+bwd
through `attnhub.attention` (its backward as the forward planned it, and unplanned: planned by `launch.backward` on
the engine's thread; then, as F.sdpa's, with the engine's multithreading off, so the backward runs on the calling
thread: what the engine's device thread adds), `FlashRopeAttention.apply`, a `Null` autograd.Function that
launches nothing (the autograd engine's own floor), F.sdpa, and the launcher's parts (`launch.forward`,
`launch.backward`, the planned `FusedBackward.run`, the compile-ahead key, an allocation, a kept-runner launch and
its key), two rounds each.

The training rows ending in ", Triton's launcher" run with kept runners launching through Triton's launcher
(`settings.triton_launcher`), the others through the driver (`backends/_driver_launch.py`), where it applies.

`thread`: where a fwd+bwd's host time goes at the tiny shape, as medians of 500 calls, two rounds: the forward, the
engine's hand-over to the backward, the backward's own Python (stamped inside it) and the hand-back, with the
engine's device thread (as shipped) and with its multithreading off (the calling thread runs the backward); for
`attnhub.attention` (both launchers) and for a `Timed` Function whose backward does nothing, a Python loop, three
allocations or the planned `FusedBackward.run`, each also called directly.

`floor`: what a C++ autograd node would save, before one is built. Host µs per fwd+bwd at the tiny shape, by
`benchkit.host_us` (the rows' loops interleaved, best of ten): F.sdpa; the Python `Null` Function and `Null8` (our
Function's eight inputs and five saved tensors); a C++ node that launches nothing (`host_floor_ext.cpp`, compiled here
by `torch.utils.cpp_extension.load`, about a minute); the C++ node calling a Python no-op in its backward (the GIL on
the engine's device thread); the C++ node calling the kept forward and backward launchers (a C++ node with today's
Python launchers), against the two launchers back to back on the calling thread with no autograd (what running the
backward's launcher on the engine's thread adds); attnhub (replayed from C++ since session 16: `triton_fa_rope.replay`),
and its Python path inside a settings override; and `DriverNode`, a C++ node that runs the tiny call's
planned kernels (the resident Gluon forward, the fused backward) through the CUDA driver with the parameters
`_driver_launch` packed, its outputs and gradients first checked bit for bit against attnhub's: the floor of a C++
operator with a C++ backward. The two C++ nodes also run behind dispatcher operators (`torch.ops.attnhub_floor`), as
PyTorch's own operators are called; and `DriverBodies`, a Python Function whose forward and backward are one C++
call each (DriverNode's bodies). `--device cpu` smoke-tests the section: the engine then
runs the backward on the calling thread, so its numbers say nothing of a GPU host (on this project's 2-core CPU
machine a C++ node cost more than the Python Function: 14 against 4.4 µs forward, 67-72 against 41-44 fwd+bwd).

Host-bound numbers vary between runs: compare rounds. Needs a CUDA GPU (except `floor --device cpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import pathlib
import pstats
import time

import torch
import torch.nn.functional as F
import triton

import attnhub
from attnhub import benchkit, settings
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import autograd as ag
from attnhub.backends.triton_fa_rope import configs
from attnhub.backends.triton_fa_rope import launch as L

SCALE = 0.125


def make(B, H=6, N=197, D=64):
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16)
    return (*qkv.permute(2, 0, 3, 1, 4).unbind(0), attnhub.CosSinTable(grid=(14, 14), head_dim=D, device="cuda"))


def tiny_training():
    """The tiny training call's inputs: q, k, v (1, 1, 17, 64) bf16 leaves, do, a table with one prefix token and
    its `Table` as the training forward hands it to the kernels."""
    q, k, v = (torch.randn(1, 1, 17, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    t = attnhub.CosSinTable(grid=(4, 4), head_dim=64, device="cuda", prefix_tokens=1)
    return q, k, v, torch.randn_like(q), t, L.Table(*t.cos_sin(), t.prefix_tokens, t.layout)


def timed(fn, n=300):
    """-> (host µs, wall µs) per call of n calls after 30 untimed ones."""
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / n * 1e6


def profile(fn, calls=500, top=25):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def best(fn, n=500, rounds=3) -> float:
    """Host µs per call of fn: the best of `rounds` loops of n calls (`timed`)."""
    return min(timed(fn, n)[0] for _ in range(rounds))


class Null(torch.autograd.Function):
    """A Python autograd.Function that launches nothing but an allocation: the engine's and the Function's floor."""

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, g):
        return g, g, g


class Null8(torch.autograd.Function):
    """`Null` with FlashRopeAttention's signature: eight inputs, five saved tensors, three attributes on ctx."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, rope, scale, mask):
        o = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, o, cos)
        ctx.table_meta, ctx.has_mask, ctx.scale = (1, "interleaved"), mask is not None, scale
        return o

    @staticmethod
    def backward(ctx, g):
        ctx.saved_tensors
        return g, g, g, None, None, None, None, None


TRITONS = ", Triton's launcher"  # rows timed with every kept runner launching through Triton's launcher


@contextlib.contextmanager
def tritons_launcher():
    """Within the block kept runners launch through Triton's launcher, not the driver's (`_driver_launch`): fresh
    caches, their runners kept at the block's first calls."""
    with settings.override(triton_launcher="triton"), runtime.fresh_caches():
        yield


def kept_launch(r):
    return lambda: runtime.launch(r.kernel, r.grid, r.args, r.num_warps, r.num_stages, **r.constexprs)


def launch_key(r):
    """The key `runtime.launch` builds from a launch's arguments (as in `runtime.launch_keyed` with key=None)."""
    return lambda: (r.kernel, 0, r.num_warps, r.num_stages, tuple(r.constexprs.items()),
                    tuple([a if type(a) is int else (a.dtype, a.data_ptr() % 16 == 0)
                           if isinstance(a, torch.Tensor) else runtime._other_key(a) for a in r.args]))


def inference_rows(cfg) -> dict:
    q, k, v, t = make(256)
    tab = L.Table(*t.cos_sin(), t.prefix_tokens, t.layout)
    with runtime.recording(run=True) as rec:
        L.forward(q, k, v, tab, SCALE, False, cfg)
    (r,) = rec
    return {
        "inf F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "inf attnhub": lambda: attnhub.attention(q, k, v, t),
        "inf entry": lambda: ag.attention(q, k, v, t, SCALE),
        "inf launch.forward": lambda: L.forward(q, k, v, tab, SCALE, False, cfg),
        f"inf runtime.launch {r.name}": kept_launch(r),
    }


def training_rows(cfg) -> dict:
    q, k, v, do, t, tab = tiny_training()
    o, lse, (qr, kr) = L.forward(q, k, v, tab, SCALE, True, cfg)

    def step(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(do)
        return run

    def unplanned(fn):  # the forward plans no backward: `launch.backward` plans it on the engine's thread
        def run():
            L.plan_backward = no_plan
            try:
                fn()
            finally:
                L.plan_backward = planner
        return run

    def one_thread(fn):  # the autograd engine runs the backward on the calling thread
        def run():
            with torch.autograd.set_multithreading_enabled(False):
                fn()
        return run

    planner, no_plan = L.plan_backward, lambda *args, **kwargs: None
    plan = L.plan_backward(qr, kr, v, o, tab, SCALE, cfg, None)
    rows = {
        "F.sdpa fwd+bwd": step(lambda: F.scaled_dot_product_attention(q, k, v)),
        "attnhub fwd+bwd": step(lambda: attnhub.attention(q, k, v, t)),
        "attnhub fwd+bwd, backward unplanned": unplanned(step(lambda: attnhub.attention(q, k, v, t))),
        # the engine's device thread against the calling thread (what a backward's Python costs there)
        "F.sdpa fwd+bwd, one thread": one_thread(step(lambda: F.scaled_dot_product_attention(q, k, v))),
        "attnhub fwd+bwd, one thread": one_thread(step(lambda: attnhub.attention(q, k, v, t))),
        "Function.apply fwd+bwd": step(lambda: ag.FlashRopeAttention.apply(q, k, v, *t.cos_sin(), t, SCALE, None)),
        "Null Function fwd+bwd": step(lambda: Null.apply(q, k, v)),
        f"attnhub fwd+bwd{TRITONS}": step(lambda: attnhub.attention(q, k, v, t)),
        f"attnhub fwd (grad){TRITONS}": lambda: attnhub.attention(q, k, v, t),
        f"FusedBackward.run (planned){TRITONS}": lambda: plan.run(do, qr, kr, v, o, lse, tab),
        "F.sdpa fwd (grad)": lambda: F.scaled_dot_product_attention(q, k, v),
        "attnhub fwd (grad)": lambda: attnhub.attention(q, k, v, t),
        "launch.forward train": lambda: L.forward(q, k, v, tab, SCALE, True, cfg),
        "launch.backward fused": lambda: L.backward(do, qr, kr, v, o, lse, tab, SCALE, cfg, True),
        "FusedBackward.run (planned)": lambda: plan.run(do, qr, kr, v, o, lse, tab),
        "compile_ahead key": lambda: L.compile_ahead(q, k, v, tab, SCALE, cfg),
        "torch.empty x1": lambda: torch.empty(1, 17, 64, device="cuda", dtype=torch.bfloat16),
        "q.new_empty(1) x1": lambda: q.new_empty(1, dtype=torch.uint8),
        "configs.for_call": lambda: configs.for_call(q.device, 64),
    }
    with runtime.recording(run=True) as rec:
        L.forward(q, k, v, tab, SCALE, True, cfg)
        L.backward(do, qr, kr, v, o, lse, tab, SCALE, cfg, True)
    for r in rec:
        rows[f"runtime.launch {r.name}"] = kept_launch(r)
        rows[f"  key only {r.name}"] = launch_key(r)
    return rows


def paths() -> None:
    rows = []
    for B in (256, 4):
        q, k, v, t = make(B)
        cands = {
            "fa_rope gluon kept": lambda: attnhub.attention(q, k, v, t, backend="triton_fa_rope"),
            "rope_sdpa": lambda: attnhub.attention(q, k, v, t, backend="triton_rope_sdpa"),
            "F.sdpa no rope": lambda: F.scaled_dot_product_attention(q, k, v),
            "auto": lambda: attnhub.attention(q, k, v, t),
        }
        with torch.no_grad():
            for r in range(2):
                rows += [(B, r, name, *timed(fn)) for name, fn in cands.items()]
                with runtime.fresh_caches(keep_runners=False):
                    rows.append((B, r, "fa_rope gluon kernel[grid]", *timed(cands["fa_rope gluon kept"])))
            if B == 4:
                profile(cands["fa_rope gluon kept"], top=18)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'B':>4} {'round':>5} {'path':28s} {'host us':>8} {'wall us':>8}")
    for B, r, name, host, wall in rows:
        print(f"{B:4d} {r:5d} {name:28s} {host:8.1f} {wall:8.1f}")

    q, k, v, _ = make(1, H=1, N=17)
    t = attnhub.CosSinTable(grid=(4, 4), head_dim=64, device="cuda")
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    train = {"fa_rope fwd+bwd": lambda: attnhub.attention(q, k, v, t, backend="triton_fa_rope").backward(do),
             "rope_sdpa fwd+bwd": lambda: attnhub.attention(q, k, v, t, backend="triton_rope_sdpa").backward(do),
             "F.sdpa fwd+bwd": lambda: F.scaled_dot_product_attention(q, k, v).backward(do)}
    for r in range(2):
        for name, fn in train.items():
            print(f"tiny r{r} {name:22s} host {timed(fn, 500)[0]:7.1f} us")
    profile(train["fa_rope fwd+bwd"])


def breakdown() -> None:
    cfg = configs.for_call(torch.device("cuda", torch.cuda.current_device()), 64)
    with torch.no_grad():
        res = {name: best(fn, 300) for name, fn in inference_rows(cfg).items()}
    for name, fn in training_rows(cfg).items():  # two rounds: host cells vary run to run
        with tritons_launcher() if name.endswith(TRITONS) else contextlib.nullcontext():
            res[name] = (best(fn), best(fn))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; host us per call (best of 3x500; train: two "
          "rounds)")
    for name, val in res.items():
        print(f"{name:58s} " + (" ".join(f"{x:7.1f}" for x in val) if isinstance(val, tuple) else f"{val:7.1f}"))


def floor(device: str = "cuda") -> None:
    from torch.utils.cpp_extension import load

    t0 = time.perf_counter()
    cuda_h = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "include"  # Triton's cuda.h
    ext = load("attnhub_host_floor", [str(pathlib.Path(__file__).with_name("host_floor_ext.cpp"))],
               extra_include_paths=[str(cuda_h)])
    print(f"host_floor_ext built in {time.perf_counter() - t0:.1f} s")
    x = benchkit.inputs(benchkit.TINY, device, torch.bfloat16)
    t = benchkit.rope_table(benchkit.TINY, device)
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    do, cos_sin = x["do"], t.cos_sin()

    def step(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(do)
        return run

    rows = {"F.sdpa": step(lambda: F.scaled_dot_product_attention(q, k, v)),
            "Null (Python Function)": step(lambda: Null.apply(q, k, v)),
            "Null8 (Python Function, our signature)": step(lambda: Null8.apply(q, k, v, *cos_sin, t, SCALE, None)),
            "C++ NullNode": step(lambda: ext.null_apply(q, k, v)),
            "C++ NullNode as a dispatcher operator": step(lambda: torch.ops.attnhub_floor.null(q, k, v)),
            "C++ CallbackNode, Python no-op": step(lambda: ext.callback_apply(q, k, v))}
    callbacks = {}  # the callback is process-wide: each row sets its own (a no-op by default)
    if device == "cuda":
        cfg = configs.for_call(q.device, q.shape[-1])
        tab = L.Table(*cos_sin, t.prefix_tokens, t.layout)
        o, lse, (qr, kr) = L.forward(q, k, v, tab, SCALE, True, cfg)

        def launchers():
            L.forward(q, k, v, tab, SCALE, True, cfg)
            return ext.callback_apply(q, k, v)

        rows["kept launchers, no autograd"] = lambda: (L.forward(q, k, v, tab, SCALE, True, cfg),
                                                       L.backward(do, qr, kr, v, o, lse, tab, SCALE, cfg, True))
        rows["C++ CallbackNode + kept launchers"] = step(launchers)
        callbacks["C++ CallbackNode + kept launchers"] = lambda g: L.backward(do, qr, kr, v, o, lse, tab, SCALE, cfg,
                                                                              True)
        rows["attnhub.attention"] = step(lambda: attnhub.attention(q, k, v, t))  # replayed (ATTNHUB_TRITON_REPLAY)

        def python_path():
            with settings.override(triton_replay=False):
                return attnhub.attention(q, k, v, t)

        rows["attnhub.attention, Python path (in an override)"] = step(python_path)
        specs = driver_specs(step(lambda: attnhub.attention(q, k, v, t)))
        if specs is None:
            print("DriverNode: the tiny call's kept runners are not the resident forward and the fused backward, each "
                  "with a driver launch; row left out")
        else:
            ext.set_driver_launches(*specs)
            q.grad = k.grad = v.grad = None
            got = [ext.driver_apply(q, k, v, *cos_sin)]
            got[0].backward(do)
            got += [q.grad, k.grad, v.grad]
            q.grad = k.grad = v.grad = None
            ref = [attnhub.attention(q, k, v, t)]
            ref[0].backward(do)
            ref += [q.grad, k.grad, v.grad]
            print("DriverNode's o, dq, dk, dv bit for bit attnhub's:", all(torch.equal(a, b) for a, b in zip(got, ref)))
            rows["C++ DriverNode (planned kernels, driver launches)"] = step(lambda: ext.driver_apply(q, k, v,
                                                                                                    *cos_sin))
            rows["C++ DriverNode as a dispatcher operator"] = step(lambda: torch.ops.attnhub_floor.driver(q, k, v,
                                                                                                        *cos_sin))
            DriverBodies.ext = ext
            rows["Python Function, DriverNode's C++ bodies"] = step(lambda: DriverBodies.apply(q, k, v, *cos_sin))
    res = {}
    for name, fn in rows.items():
        ext.set_backward_callback(callbacks.get(name, lambda g: None))
        res[name] = [benchkit.host_us([fn], 2000, device)[0] for _ in range(2)]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; host us per "
          f"fwd+bwd at {benchkit.TINY}, two rounds of best of ten loops; ratio: to F.sdpa, first round")
    for name, (a, b) in res.items():
        print(f"{name:42s} {a:7.1f} {b:7.1f}   {a / res['F.sdpa'][0]:5.2f}x")


class DriverBodies(torch.autograd.Function):
    """A Python Function whose forward and backward are one C++ call each (`host_floor_ext`'s DriverNode bodies):
    the planned kernels through the driver, allocations in C++, the autograd node Python's."""

    ext = None

    @staticmethod
    def forward(ctx, q, k, v, cos, sin):
        o, lse, qr, kr = DriverBodies.ext.driver_forward(q, k, v, cos, sin)
        ctx.save_for_backward(qr, kr, v, o, lse, cos, sin)
        return o

    @staticmethod
    def backward(ctx, do):
        return *DriverBodies.ext.driver_backward(do, *ctx.saved_tensors), None, None


_KEPT: list = []  # the driver launches DriverNode's packed specs point into (their buffers must stay alive)


def driver_specs(train_step) -> tuple | None:
    """(forward, backward) packed launches of the tiny training call for `host_floor_ext.set_driver_launches`, from
    the kept runners of three calls with fresh caches: (function, grid, block, shared, params address, [(word address,
    argument index)], [(tensor map address, argument index)]); None unless they are the resident Gluon forward and
    the fused backward, each with a driver launch (`_driver_launch`)."""
    with settings.override(background_compile=False), runtime.fresh_caches() as state, \
            runtime.recording() as launches:
        for _ in range(3):
            train_step()
    grids = {r.name: r.grid for r in launches}
    runners = {compiled.name: driver for compiled, _, driver in state.runners.values()}
    resident = "resident_ws_fwd_kernel" if configs.for_arch(9, 64).resident_warp_specialized else "resident_fwd_kernel"
    names = (resident, "bwd_fused_kernel")
    if set(runners) != set(names) or any(driver is None for driver in runners.values()):
        return None
    _KEPT.extend(runners.values())

    def spec(r, grid):
        base = ctypes.addressof(r.buffer)
        return (r.function, list(grid), r.block, r.shared, ctypes.addressof(r.params),
                [(base + 8 * slot, i) for slot, i in r.pointers], [(address, i) for address, i, _, _ in r.maps])

    return tuple(spec(runners[name], grids[name]) for name in names)


class Timed(torch.autograd.Function):
    """A Function whose backward runs `Timed.work` between two time stamps (`STAMPS`)."""

    work = staticmethod(lambda: None)

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, g):
        STAMPS.append(time.perf_counter())
        Timed.work()
        STAMPS.append(time.perf_counter())
        return g, g, g


STAMPS: list = []


def thread() -> None:
    """Where the backward's host time goes: per fwd+bwd at the tiny shape, the forward, the engine's hand-over to the
    backward, the backward's own Python (timed inside it), and the hand-back, with the engine's device thread (as
    shipped) and with its multithreading off (the calling thread runs the backward); and each backward's work called
    directly. Medians of 500 calls, two rounds."""
    cfg = configs.for_call(torch.device("cuda", torch.cuda.current_device()), 64)
    q, k, v, do, t, tab = tiny_training()
    o, lse, (qr, kr) = L.forward(q, k, v, tab, SCALE, True, cfg)
    plan = L.plan_backward(qr, kr, v, o, tab, SCALE, cfg, None)
    works = {
        "nothing": lambda: None,
        "Python loop": lambda: sum(i * i for i in range(300)),
        "torch.empty x3": lambda: [torch.empty(1, 1, 17, 64, device="cuda", dtype=torch.bfloat16) for _ in "qkv"],
        "FusedBackward.run": lambda: plan.run(do, qr, kr, v, o, lse, tab),
    }
    grads = ag._grads

    def stamped_grads(*args, **kwargs):
        STAMPS.append(time.perf_counter())
        out = grads(*args, **kwargs)
        STAMPS.append(time.perf_counter())
        return out

    def measure(fn, one_thread: bool, n=500):
        """-> median µs of forward, hand-over, inside, hand-back."""
        parts = []
        with torch.autograd.set_multithreading_enabled(not one_thread):
            for i in range(n + 50):
                q.grad = k.grad = v.grad = None
                STAMPS.clear()
                t0 = time.perf_counter()
                out = fn()
                t1 = time.perf_counter()
                out.backward(do)
                t2 = time.perf_counter()
                enter, leave = STAMPS[0], STAMPS[-1]
                if i >= 50:
                    parts.append((t1 - t0, enter - t1, leave - enter, t2 - leave))
        torch.cuda.synchronize()
        return [sorted(col)[len(col) // 2] * 1e6 for col in zip(*parts)]

    def direct(work, n=500):
        for _ in range(50):
            work()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            work()
            times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        return sorted(times)[n // 2] * 1e6

    rows = []
    for rnd in range(2):
        for name, work in works.items():
            Timed.work = staticmethod(work)
            for one in (False, True):
                rows.append((rnd, f"Timed, {name}", "calling" if one else "engine",
                             *measure(lambda: Timed.apply(q, k, v), one)))
            rows.append((rnd, f"{name} direct", "calling", 0.0, 0.0, direct(work), 0.0))
        ag._grads = stamped_grads
        try:
            for tag, ctx in (("", contextlib.nullcontext), (TRITONS, tritons_launcher)):
                with ctx():
                    for one in (False, True):
                        rows.append((rnd, f"attnhub.attention{tag}", "calling" if one else "engine",
                                     *measure(lambda: attnhub.attention(q, k, v, t), one)))
        finally:
            ag._grads = grads
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; median host us per fwd+bwd at (1, 1, 17, 64)")
    print(f"{'r':>1} {'backward':50s} {'thread':8s} {'fwd':>7} {'handover':>8} {'inside':>7} {'handback':>8} "
          f"{'total':>7}")
    for rnd, name, where, *us in rows:
        print(f"{rnd:1d} {name:50s} {where:8s} " + " ".join(f"{x:7.1f}" if i != 1 and i != 3 else f"{x:8.1f}"
                                                            for i, x in enumerate(us)) + f" {sum(us):7.1f}")


SECTIONS = {"paths": paths, "breakdown": breakdown, "floor": floor, "thread": thread}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="paths,breakdown", help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to smoke-test the floor section")
    args = p.parse_args(argv)
    for name in args.sections.split(","):
        if name not in SECTIONS:
            p.error(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
        if name == "floor":
            floor(args.device)
        else:
            SECTIONS[name]()


if __name__ == "__main__":
    main()
