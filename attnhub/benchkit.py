"""What every attnhub benchmark shares: the shapes, the timer, the error measure and the environment record.

Used by the kernel table (`attnhub.bench`, `python -m attnhub bench`) and the scripts of `benchmarks/`
(`bench_e2e.py`, `sweep.py`), so that a number in one report means the same as in another.

- Shapes: the five ViT attention shapes `VIT_SHAPES` and the host-bound `TINY` shape.
- Timer: `time_ms`, the median of `triton.testing.do_bench` on CUDA (the L2 cache flushed before every repetition);
  on the CPU a `time.perf_counter` median with the same budgets stands in (smoke tests only). `host_us` times
  loops of calls with one synchronization per loop: host time, where the device work is negligible.
- Error: `errors` is the relative L2 error of o, dq, dk, dv against `reference`, `math` run in float64 on the same
  (upcast) inputs; `within_bounds` compares it with the bounds of `attnhub.tolerances`, the table the tests use;
  `nan_empty` NaN-fills new buffers while a checked call runs (so do the tests), so unwritten output shows.
- Environment: `environment` records the device, driver, CUDA, versions of python/torch/triton/timm/attnhub, the
  ATTNHUB_* variables set and the git commit of the attnhub source that ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import torch

import attnhub
from attnhub.rope import CosSinTable

# NOTE: attnhub/tolerances.py is the one tolerance table (issue 10, owned by its own change); the benchmarks
# read their bounds from it, as the tests and `python -m attnhub check` do.
from attnhub.tolerances import bound, rel_l2


@dataclasses.dataclass(frozen=True)
class Shape:
    """q, k, v: [B, H, N, D]; N = P + grid**2 (P prefix tokens, CLS and registers, are not rotated)."""

    name: str
    B: int
    H: int
    N: int
    D: int
    P: int
    grid: int

    def __post_init__(self) -> None:
        if self.N != self.P + self.grid**2:
            raise ValueError(f"shape {self.name}: N must be P + grid**2 = {self.P + self.grid**2}, got {self.N}")

    def __str__(self) -> str:
        return f"{self.name} ({self.B},{self.H},{self.N},{self.D})"


VIT_SHAPES = {
    s.name: s
    for s in (
        Shape("vit_s16_224", 256, 6, 197, 64, 1, 14),
        Shape("vit_b16_224", 256, 12, 197, 64, 1, 14),
        Shape("vit_l16_224", 128, 16, 197, 64, 1, 14),
        Shape("vit_b16_384", 64, 12, 577, 64, 1, 24),
        Shape("vit_b16_512_reg4", 32, 12, 1029, 64, 5, 32),  # 4 register tokens + CLS
    )
}
# One image, one head, 17 tokens: the device work is a few microseconds, so a loop of calls measures the host.
TINY = Shape("tiny_host", 1, 1, 17, 64, 1, 4)
PASSES = ("fwd", "fwdbwd")  # forward only; forward and backward (o.backward(do))


def parse_shape(spec: str) -> Shape:
    """A name of `VIT_SHAPES`, "tiny_host", or `custom:B,H,N,D,P,grid`."""
    if spec in VIT_SHAPES:
        return VIT_SHAPES[spec]
    if spec == TINY.name:
        return TINY
    kind, _, dims = spec.partition(":")
    try:
        B, H, N, D, P, g = (int(x) for x in dims.split(","))
    except ValueError:
        kind = ""
    if kind != "custom":
        raise ValueError(f"unknown shape {spec!r}: expected one of {[*VIT_SHAPES, TINY.name]} or "
                         "custom:B,H,N,D,P,grid")
    return Shape(f"custom_{B}x{H}x{N}x{D}", B, H, N, D, P, g)


def rope_table(s: Shape, device: torch.device | str, layout: str = "interleaved") -> CosSinTable:
    """The timm-convention table of shape `s` (base 100, square grid)."""
    return CosSinTable(grid=(s.grid, s.grid), head_dim=s.D, prefix_tokens=s.P, layout=layout, device=device)


def inputs(s: Shape, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Separate contiguous q, k, v and the output gradient do: [B, H, N, D], standard normal, seeded."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return {n: torch.randn(s.B, s.H, s.N, s.D, device=device, dtype=dtype, generator=gen)
            for n in ("q", "k", "v", "do")}


# ------------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _warm(fn: Callable[[], object]) -> None:
    """Two untimed calls of `fn` (a training call's second starts the build of its C++ replay), the wait for what
    they left compiling in the background (`attnhub.wait_for_compiles`), and a third call (which builds the replay),
    so that the timings see the path that serves its shape from then on."""
    fn()
    fn()
    attnhub.wait_for_compiles()
    fn()


def time_ms(fn: Callable[[], object], *, device: torch.device | str, warmup: int = 50, rep: int = 200,
            grads: Sequence[torch.Tensor] | None = None) -> float:
    """Median ms per call of `fn`; `warmup` and `rep` are budgets in ms (do_bench's), `grads` are set to None
    before every repetition (so a backward does not accumulate into them)."""
    _warm(fn)
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median")
    end = time.perf_counter() + warmup / 1e3
    while time.perf_counter() < end:
        fn()
    times, end = [], time.perf_counter() + rep / 1e3
    while time.perf_counter() < end or len(times) < 3:
        for g in grads or ():
            g.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def gpu_ms(fn: Callable[[], object], *, device: torch.device | str, iters: int = 20,
           grads: Sequence[torch.Tensor] | None = None) -> float:
    """Device ms per call of `fn` on a GPU: the summed durations of the kernels and copies it runs, from
    torch.profiler over `iters` calls after one untimed call. Host gaps between launches do not count (unlike
    `time_ms`, which at small shapes measures the host): this is what the call costs a GPU-bound model step."""
    return sum(gpu_kernels_ms(fn, device=device, iters=iters, grads=grads).values())


def gpu_kernels_ms(fn: Callable[[], object], *, device: torch.device | str, iters: int = 20,
                   grads: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
    """`gpu_ms` per kernel (or copy): {name: device ms per call of `fn`}."""
    from torch.profiler import ProfilerActivity, profile

    if torch.device(device).type != "cuda":
        raise ValueError(f"gpu_ms, gpu_kernels_ms: need a CUDA device, got {device}")
    _warm(fn)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for g in grads or ():
                g.grad = None
            fn()
        sync(device)
    return {e.key: e.self_device_time_total / iters / 1e3 for e in prof.key_averages() if e.self_device_time_total}


def host_us(fns: Sequence[Callable[[], object]], calls: int, device: torch.device | str,
            rounds: int = 10) -> list[float]:
    """Host µs per call of each fn: loops of the fns interleaved (so a drifting host affects all alike), the best
    loop of each (noise only adds), with one synchronization at the end of each loop."""
    for fn in fns:
        _warm(fn)
    sync(device)
    n, best = max(1, calls // rounds), [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            best[i] = min(best[i], (time.perf_counter() - start) / n)
    return [b * 1e6 for b in best]


def host_us_fwdbwd(contexts: dict[str, Callable[[], ContextManager]], device: torch.device | str,
                   backend: str = "triton_fa_rope") -> dict[str, float]:
    """Host µs per cached fwd+bwd through `attnhub.attention(..., backend=backend)` at `TINY` (the device work is a
    few µs), once inside each named context (e.g. a config override), and F.sdpa's ("sdpa"), by `host_us`."""
    x = inputs(TINY, device, torch.bfloat16)
    table = rope_table(TINY, device)
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    fns = {}
    for name, context in contexts.items():
        def call(context=context):
            with context():
                attnhub.attention(q, k, v, rope=table, backend=backend).backward(x["do"])
        fns[name] = call
    fns["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(x["do"])
    return dict(zip(fns, host_us(list(fns.values()), 2000, device)))


# ------------------------------------------------------------------------------------------------------- error
def reference(x: dict[str, torch.Tensor], rope: CosSinTable | None, backward: bool) -> list[torch.Tensor | None]:
    """[o, dq, dk, dv] of `math` in float64 on x's q, k, v (and do); the grads are None without `backward`."""
    q, k, v = (x[n].detach().double().requires_grad_(backward) for n in "qkv")
    o = attnhub.attention(q, k, v, rope, backend="math")
    if not backward:
        return [o.detach(), None, None, None]
    o.backward(x["do"].double())
    return [o.detach(), q.grad, k.grad, v.grad]


@contextlib.contextmanager
def nan_empty() -> Iterator[None]:
    """Within the block every floating `torch.empty` / `torch.empty_like` buffer comes NaN-filled, so a kernel that
    leaves part of its output (or a scratch it reads) unwritten gives non-finite values instead of stale ones."""
    real = torch.empty, torch.empty_like

    def poison(make):
        def poisoned(*args, **kwargs):
            out = make(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out
        return poisoned

    torch.empty, torch.empty_like = (poison(make) for make in real)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real


def errors(got: Sequence[torch.Tensor | None], ref: Sequence[torch.Tensor | None]) -> dict[str, float | None]:
    """Relative L2 error of each of o, dq, dk, dv against the reference (None where either is missing)."""
    return {name: None if a is None or b is None else rel_l2(a, b)
            for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref)}


def within_bounds(errs: dict[str, float | None], dtype: torch.dtype) -> bool:
    """Every error present is below the bound of `attnhub.tolerances` for `dtype` (False for NaN)."""
    return all(e <= bound(dtype, grad=name != "o") for name, e in errs.items() if e is not None)


# ------------------------------------------------------------------------------------------------- environment
def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """stdout of `cmd`, stripped; None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the attnhub source that runs, "+dirty" when it has uncommitted changes; None outside git.
    $ATTNHUB_GIT_COMMIT, where set, is taken as it is: a copied checkout (the lent GPU's) can carry a stale .git."""
    if os.environ.get("ATTNHUB_GIT_COMMIT"):
        return os.environ["ATTNHUB_GIT_COMMIT"]
    src = Path(attnhub.__file__).resolve().parent
    commit = _run(["git", "rev-parse", "HEAD"], src)
    if commit and _run(["git", "status", "--porcelain", "--untracked-files=no"], src):
        commit += "+dirty"
    return commit


def environment(device: torch.device | str) -> dict:
    """Device, driver, CUDA/cuDNN, versions of python/torch/triton/timm/attnhub, the git commit and the ATTNHUB_*
    variables set (`attnhub.settings`: e.g. a run with ATTNHUB_TRITON_REPLAY=0 says so)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else None
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "compute_capability": "%d.%d" % torch.cuda.get_device_capability(device) if cuda else None,
        "driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "versions": {"attnhub": attnhub.__version__, "torch": torch.__version__, "triton": _version("triton"),
                     "timm": _version("timm"), "python": platform.python_version()},
        "git_commit": git_commit(),
        "settings": {name: value for name, value in sorted(os.environ.items())
                     if name.startswith("ATTNHUB_") and name != "ATTNHUB_GIT_COMMIT"},
    }


def error_text(exc: BaseException) -> str:
    """One line naming an exception, for a report: its type and its message's first line (at most 300 chars)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
