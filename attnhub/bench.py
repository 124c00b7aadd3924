"""Kernel benchmark: attnhub's backends against timm's RoPE attention, SDPA without RoPE, and the HBM floor.

All implementations run in one process on one device. On CUDA each time is the median of
`triton.testing.do_bench(fn, warmup=50, rep=200)` (the L2 cache is flushed before every repetition), as the
baselines of ANCHORS.md were measured; on CPU a `time.perf_counter` median stands in (smoke tests only).

    python -m attnhub bench --out benchmarks/results/h100.json --plot benchmarks/results/h100.png

Implementations (`--impls`):
  attnhub:<backend>        attnhub.attention(q, k, v, rope=table, backend=<backend>)
  timm_eager               timm's RoPE path: apply_rot_embed_cat on q and k after the prefix tokens, then SDPA
  timm_compiled            the same function under torch.compile (default mode)
  sdpa_flash, sdpa_cudnn   F.scaled_dot_product_attention forced to that kernel, WITHOUT RoPE
Passes: `fwd`, and `fwdbwd` (o.backward(do) with a fixed random do; q, k, v grads reset to None every repetition).
Before timing, every implementation's first call on a shape is timed (compilation included) and the RoPE ones
are checked against the reference (timm_eager): one that fails the check is not timed.

The JSON report (`--out`): date, environment (GPU, versions of torch/triton/timm/attnhub, CUDA), config,
copy_bandwidth_gbs, shapes, results (one record per shape and pass: ms, errors, floor_ms, pct_of_floor, ratios of
the primary implementation), checks (per shape and implementation: first_call_s, rel_l2 of o/dq/dk/dv, ok,
error), dispatch_overhead_us (per backend: attention_us, entry_us, overhead_us).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import inspect
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

import attnhub
from attnhub.registry import REGISTRY
from attnhub.rope import CosSinTable
from attnhub.tolerances import bound_between, rel_l2

log = logging.getLogger(__name__)

SHAPES = {  # name: (B, H, N, D, P, grid); N = P + grid**2
    "vit_s16_224": (256, 6, 197, 64, 1, 14),
    "vit_b16_224": (256, 12, 197, 64, 1, 14),
    "vit_l16_224": (128, 16, 197, 64, 1, 14),
    "vit_b16_384": (64, 12, 577, 64, 1, 24),
    "vit_b16_512_reg4": (32, 12, 1029, 64, 5, 32),
}
PASSES = ("fwd", "fwdbwd")
BASELINES = ("timm_eager", "timm_compiled", "sdpa_flash", "sdpa_cudnn")
PRIMARY = "attnhub:triton_fa_rope"
RATIO_VS = ("sdpa_cudnn", "timm_compiled")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# [B, H, N, D] tensors that must cross HBM at least once. fwd: read q, k, v, write o. The backward reads q, k,
# v, o, dO and writes dq, dk, dv (the reading of ANCHORS.md's floor figures: 12 tensors for fwd+bwd).
TENSORS_MOVED = {"fwd": 4, "fwdbwd": 12}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    N: int
    D: int
    P: int  # prefix tokens (CLS, registers), not rotated
    grid: int  # square patch grid, N = P + grid**2

    def __str__(self) -> str:
        return f"{self.name} ({self.B},{self.H},{self.N},{self.D})"


@dataclasses.dataclass
class Impl:
    fn: Callable  # (q, k, v) -> o, all [B, H, N, D]
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around every call (SDPA forcing)
    rope: bool = True  # computes RoPE attention, so it is checked against the reference


def parse_shape(spec: str) -> Shape:
    """A name of `SHAPES`, or `custom:B,H,N,D,P,grid`."""
    if spec in SHAPES:
        return Shape(spec, *SHAPES[spec])
    kind, _, dims = spec.partition(":")
    try:
        B, H, N, D, P, g = (int(x) for x in dims.split(","))
    except ValueError:
        kind = None
    if kind != "custom":
        raise ValueError(f"unknown shape {spec!r}: expected one of {list(SHAPES)} or custom:B,H,N,D,P,grid")
    if N != P + g * g:
        raise ValueError(f"shape {spec!r}: N must be P + grid**2 = {P + g * g}, got {N}")
    return Shape(f"custom_{B}x{H}x{N}x{D}", B, H, N, D, P, g)


# ------------------------------------------------------------------------------------------- implementations
def build(impl: str, s: Shape, device: torch.device) -> Impl:
    """The callable of implementation `impl` for shape `s` (its RoPE table built here, outside the timing)."""
    if impl.startswith("attnhub:"):
        backend = impl.partition(":")[2]
        table = CosSinTable(grid=(s.grid, s.grid), head_dim=s.D, prefix_tokens=s.P, layout="interleaved",
                            device=device)
        return Impl(lambda q, k, v: attnhub.attention(q, k, v, rope=table, backend=backend))
    if impl in ("timm_eager", "timm_compiled"):
        fn = _timm_rope_attention(s, device)
        return Impl(torch.compile(fn) if impl == "timm_compiled" else fn)
    if impl in ("sdpa_flash", "sdpa_cudnn"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
        return Impl(F.scaled_dot_product_attention, lambda: sdpa_kernel([kernel]), rope=False)
    raise ValueError(f"unknown implementation {impl!r}")


def _timm_rope_attention(s: Shape, device: torch.device) -> Callable:
    """timm's attention with RoPE (timm/models/eva.py): rotate q, k after the P prefix tokens, then SDPA."""
    from timm.layers import RotaryEmbeddingCat, apply_rot_embed_cat

    rope = RotaryEmbeddingCat(dim=s.D, temperature=100, in_pixels=False, grid_indexing="xy", feat_shape=(s.grid,) * 2)
    emb = rope.get_embed().to(device)  # [grid**2, 2 D] = cat(sin, cos), float32
    P = s.P

    def timm_rope_attention(q, k, v):
        q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], emb)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], emb)], dim=2).type_as(v)
        return F.scaled_dot_product_attention(q, k, v)

    return timm_rope_attention


def default_impls(device: torch.device, dtype: torch.dtype, with_math: bool = False) -> list[str]:
    """attnhub's backends that can run RoPE attention of `dtype` on `device` (math only on request), then the
    baselines (on CPU only timm_eager)."""
    x = torch.empty(1, 1, 17, 64, device=device, dtype=dtype)
    reasons = attnhub.explain(x, x, x, CosSinTable(grid=(4, 4), head_dim=64, device=device)).reasons
    names = [f"attnhub:{n}" for n, why in reasons.items() if not why and (with_math or n != "math")]
    return names + list(BASELINES if device.type == "cuda" else ("timm_eager",))


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench(fn: Callable, grads: list | None, warmup: int, rep: int) -> float:
    """Median ms of `triton.testing.do_bench` (return_mode exists since triton 2.2; quantiles before)."""
    import triton.testing

    if "return_mode" in inspect.signature(triton.testing.do_bench).parameters:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median")
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, quantiles=[0.5])


def _cpu_bench(fn: Callable, grads: list | None, warmup: int, rep: int) -> float:
    """Median ms by `time.perf_counter`, with do_bench's warmup and rep budgets in ms (CPU smoke runs)."""
    fn()
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


def copy_bandwidth(device: torch.device, timer: Callable) -> float:
    """Device-to-device copy bandwidth `dst.copy_(src)` in GB/s, counting the bytes read and written."""
    n = 2**28 if device.type == "cuda" else 2**24  # float32: 1 GiB per tensor on CUDA, far beyond L2
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), None)
    return 2 * n * src.element_size() / (ms * 1e-3) / 1e9


def _first_call(impl: Impl, x: dict, backward: bool, device: torch.device) -> tuple[list, float]:
    """One call on fresh leaves -> ([o, dq, dk, dv] (grads None without backward), wall seconds)."""
    q, k, v = (x[n].detach().requires_grad_(backward) for n in "qkv")
    _sync(device)
    start = time.perf_counter()
    with impl.context():
        o = impl.fn(q, k, v)
        if backward:
            o.backward(x["do"])
    _sync(device)
    return [o.detach(), q.grad, k.grad, v.grad], time.perf_counter() - start


def _time_pass(impl: Impl, x: dict, pass_: str, timer: Callable) -> float:
    backward = pass_ == "fwdbwd"
    q, k, v = (x[n].detach().requires_grad_(backward) for n in "qkv")
    if backward:
        fn = lambda: impl.fn(q, k, v).backward(x["do"])  # noqa: E731
    else:
        fn = lambda: impl.fn(q, k, v)  # noqa: E731
    with impl.context():
        return timer(fn, [q, k, v] if backward else None)


def _rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """Relative L2 error of `a` against `b` (None when either is missing)."""
    return None if a is None or b is None else rel_l2(a, b)


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _host_us(fns: list[Callable], calls: int, device: torch.device, rounds: int = 10) -> list[float]:
    """Host µs per call of each fn: loops of the fns interleaved, the best loop of each (noise only adds), with a
    synchronization only at the end of each loop."""
    for fn in fns:
        fn()
    _sync(device)
    n, best = max(1, calls // rounds), [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            best[i] = min(best[i], (time.perf_counter() - start) / n)
    return [b * 1e6 for b in best]


def dispatch_overhead(backends: list[str], device: torch.device, dtype: torch.dtype, calls: int = 2000) -> dict:
    """µs per call of `attnhub.attention` (cached decision) minus the backend's entry function called directly.

    At q, k, v: [1, 1, 17, 64] the GPU work is negligible, so both loops measure host time. "auto" is the call
    without `backend=`, against the entry of the backend it chooses.
    """
    q, k, v = (torch.randn(1, 1, 17, 64, device=device, dtype=dtype) for _ in range(3))
    table = CosSinTable(grid=(4, 4), head_dim=64, prefix_tokens=1, device=device)
    out = {}
    for name in [*backends, None]:
        try:
            chosen = name or attnhub.explain(q, k, v, table).chosen
            entry = REGISTRY.entry(chosen)
            via, direct = _host_us([lambda: attnhub.attention(q, k, v, rope=table, backend=name),
                                    lambda: entry(q, k, v, table, 64**-0.5)], calls, device)
            out[name or "auto"] = {"backend": chosen, "attention_us": via, "entry_us": direct,
                                   "overhead_us": via - direct}
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
            out[name or "auto"] = {"error": _error(exc)}
    out["noop"] = _noop_overhead(q, k, v, table, calls, device)
    return out


def _noop_overhead(q, k, v, table, calls: int, device: torch.device) -> dict:
    """The dispatch alone: `attnhub.attention` routed (automatically) to a registered backend that returns q,
    against that function called directly. No kernel runs, so the difference is not two large noisy timings."""
    def noop(q, k, v, rope, scale):
        return q

    snapshot = REGISTRY.snapshot()
    try:
        attnhub.register_backend("_bench_noop", noop, priority=10**9)
        via, direct = _host_us([lambda: attnhub.attention(q, k, v, rope=table), lambda: noop(q, k, v, table, 0.125)],
                               calls, device)
    finally:
        REGISTRY.restore(snapshot)
    return {"backend": "_bench_noop", "attention_us": via, "entry_us": direct, "overhead_us": via - direct}


# ------------------------------------------------------------------------------------------------------- run
def _environment(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "compute_capability": "%d.%d" % torch.cuda.get_device_capability(device) if cuda else None,
        "versions": {"attnhub": attnhub.__version__, "torch": torch.__version__, "triton": version("triton"),
                     "timm": version("timm"), "python": platform.python_version()},
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
    }


def _reference() -> str:
    return "timm_eager" if importlib.util.find_spec("timm") else "attnhub:math"


def _check_shape(s: Shape, built: dict, x: dict, backward: bool, ref_name: str, device, tol: float) -> dict:
    """First call of every implementation (wall s) and relative errors of the RoPE ones against `ref_name`.

    Returns {impl: {"first_call_s", "rel_l2": {o, dq, dk, dv}, "ok", "error"}}.
    """
    out, ref = {}, None
    names = [ref_name] + [n for n in built if n != ref_name]  # the reference first, built here if not timed
    for name in names:
        try:
            impl = built.get(name) or build(name, s, device)
            got, seconds = _first_call(impl, x, backward, device)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            out[name] = {"error": _error(exc), "ok": False}
            continue
        rec = out[name] = {"first_call_s": seconds, "ok": True}
        if name == ref_name:
            ref = got
        elif impl.rope and ref is not None:
            rec["rel_l2"] = dict(zip(("o", "dq", "dk", "dv"), (_rel(a, b) for a, b in zip(got, ref))))
            rec["ok"] = rec["rel_l2"]["o"] <= tol
            if not rec["ok"]:
                rec["error"] = f"wrong: o differs from {ref_name} by {rec['rel_l2']['o']:.2e} (> {tol:g})"
    return out


def _inputs(s: Shape, device: torch.device, dtype: torch.dtype) -> dict:
    """Separate contiguous q, k, v, do: [B, H, N, D], standard normal."""
    return {n: torch.randn(s.B, s.H, s.N, s.D, device=device, dtype=dtype) for n in ("q", "k", "v", "do")}


def run(
    shapes: list[Shape],
    passes: tuple[str, ...] = PASSES,
    impls: list[str] | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    warmup: int = 50,
    rep: int = 200,
    with_math: bool = False,
    overhead_calls: int = 2000,
    progress: bool = True,
) -> dict:
    """Measure every (shape, pass, implementation); returns the report (JSON-serializable, see `main`)."""
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    impls = list(impls or default_impls(device, dtype, with_math))
    timer = functools.partial(_do_bench if device.type == "cuda" else _cpu_bench, warmup=warmup, rep=rep)
    bandwidth = copy_bandwidth(device, timer)
    log.info("device-to-device copy: %.0f GB/s", bandwidth)
    ref_name = _reference()
    primary = PRIMARY if PRIMARY in impls else next((i for i in impls if i.startswith("attnhub:")), None)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(device),
        "config": {"dtype": str(dtype).replace("torch.", ""), "warmup_ms": warmup, "rep_ms": rep,
                   "timer": "triton.testing.do_bench median" if device.type == "cuda" else "perf_counter median",
                   "passes": list(passes), "impls": impls, "primary": primary, "reference": ref_name,
                   "tolerance_rel_l2": bound_between(dtype), "tensors_moved": TENSORS_MOVED},
        "copy_bandwidth_gbs": bandwidth,
        "shapes": {s.name: dataclasses.asdict(s) for s in shapes},
        "results": [],
        "checks": {},
    }
    bar = tqdm(total=len(shapes) * (1 + len(passes) * len(impls)), desc="bench", disable=not progress, leave=False)
    for s in shapes:
        torch.compiler.reset()  # one static graph per shape; also keeps torch.compile under its recompile limit
        torch.manual_seed(0)
        x = _inputs(s, device, dtype)
        built, skip = {}, {}
        for name in impls:
            try:
                built[name] = build(name, s, device)
            except Exception as exc:  # noqa: BLE001 - e.g. timm not installed
                skip[name] = _error(exc)
        bar.set_postfix_str(f"{s.name} first calls and check")
        checks = _check_shape(s, built, x, "fwdbwd" in passes, ref_name, device, bound_between(dtype))
        report["checks"][s.name] = {n: c for n, c in checks.items() if n in impls}
        skip.update({n: c["error"] for n, c in checks.items() if not c["ok"] and n in impls})
        bar.update()
        for pass_ in passes:
            rec = {"shape": s.name, "pass": pass_, "ms": {}, "errors": dict(skip),
                   "floor_ms": TENSORS_MOVED[pass_] * s.B * s.H * s.N * s.D * x["q"].element_size()
                   / (bandwidth * 1e9) * 1e3}
            for name in impls:
                bar.set_postfix_str(f"{s.name} {pass_} {name}")
                if name not in skip:
                    try:
                        rec["ms"][name] = _time_pass(built[name], x, pass_, timer)
                    except Exception as exc:  # noqa: BLE001
                        rec["errors"][name] = _error(exc)
                bar.update()
            ms = rec["ms"]
            rec["pct_of_floor"] = {n: 100 * rec["floor_ms"] / t for n, t in ms.items()}
            rec["ratios"] = {o: ms[primary] / ms[o] for o in RATIO_VS if primary in ms and o in ms}
            report["results"].append(rec)
        del x, built
    bar.close()
    backends = [i.partition(":")[2] for i in impls if i.startswith("attnhub:")]
    report["dispatch_overhead_us"] = dispatch_overhead(backends, device, dtype, overhead_calls)
    return report


# ------------------------------------------------------------------------------------------------ reporting
def print_tables(report: dict) -> None:
    """The timings (ms), ratios and % of the HBM floor; then first calls, errors against the reference, overhead."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    cfg, env = report["config"], report["environment"]
    impls, primary = cfg["impls"], cfg["primary"]
    title = (f"{env['device_name']}, {cfg['dtype']}, {cfg['timer']} (ms); copy bandwidth "
             f"{report['copy_bandwidth_gbs']:.0f} GB/s; primary {primary}")
    t = Table(title=title, caption=f"ratio: {primary} ms / other ms (< 1: {primary} is faster); % of floor: "
              f"HBM floor / {primary} ms")
    for col in ["shape", "pass", *impls, "HBM floor", *[f"ratio vs {o}" for o in RATIO_VS], "% of floor"]:
        t.add_column(col, justify="left" if col in ("shape", "pass") else "right")
    for rec in report["results"]:
        cells = [_ms_cell(rec, n) for n in impls]
        ratios = [f"{rec['ratios'][o]:.2f}x" if o in rec["ratios"] else "-" for o in RATIO_VS]
        pct = rec["pct_of_floor"].get(primary)
        shape = str(Shape(**report["shapes"][rec["shape"]])) if rec["pass"] == cfg["passes"][0] else ""
        t.add_row(shape, rec["pass"], *cells, f"{rec['floor_ms']:.3f}", *ratios, "-" if pct is None else f"{pct:.0f}%")
    console.print(t)

    c = Table(title=f"first call (s, compilation included) and relative L2 error vs {cfg['reference']} (o / max grad)")
    c.add_column("shape")
    for n in impls:
        c.add_column(n, justify="right")
    for shape, checks in report["checks"].items():
        c.add_row(shape, *[_check_cell(checks.get(n)) for n in impls])
    console.print(c)

    for name, o in report["dispatch_overhead_us"].items():
        if "error" in o:
            console.print(f"dispatch overhead {name}: [red]{o['error']}[/]")
        else:
            console.print(f"dispatch overhead {name} ({o['backend']}): {o['overhead_us']:.1f} µs per call "
                          f"({o['attention_us']:.1f} via attnhub.attention, {o['entry_us']:.1f} entry direct)")
    errors = {(r["shape"], n): e for r in report["results"] for n, e in r["errors"].items()}
    for (shape, name), err in errors.items():
        console.print(f"[red]{shape} {name}[/]: {err}")


def _ms_cell(rec: dict, name: str) -> str:
    if name in rec["ms"]:
        return f"{rec['ms'][name]:.3f}"
    err = rec["errors"].get(name, "")
    return "[red]wrong[/]" if err.startswith("wrong") else "[red]error[/]" if err else "-"


def _check_cell(chk: dict | None) -> str:
    if chk is None:
        return "-"
    if "first_call_s" not in chk:
        return "[red]error[/]"
    cell = f"{chk['first_call_s']:.2f} s"
    if "rel_l2" in chk:
        errs = chk["rel_l2"]
        grads = [e for e in (errs["dq"], errs["dk"], errs["dv"]) if e is not None]
        mark = "" if chk["ok"] else "[red]✗[/] "
        cell += f"  {mark}{errs['o']:.1e}" + (f" / {max(grads):.1e}" if grads else "")
    return cell


def plot(report: dict, path: str | Path) -> None:
    """Bar chart (log scale) of ms per shape and implementation, one panel per pass, the HBM floor in black."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    cfg, passes = report["config"], report["config"]["passes"]
    labels = [*cfg["impls"], "HBM floor"]
    shapes = list(report["shapes"])
    fig = Figure(figsize=(max(7.0, 1.6 * len(shapes) + 3), 3.8 * len(passes)), layout="constrained")
    axes = fig.subplots(len(passes), 1, squeeze=False)[:, 0]
    width = 0.85 / len(labels)
    for ax, pass_ in zip(axes, passes):
        recs = {r["shape"]: r for r in report["results"] if r["pass"] == pass_}
        for i, label in enumerate(labels):
            pts = [(j, recs[s]["floor_ms"] if label == "HBM floor" else recs[s]["ms"].get(label))
                   for j, s in enumerate(shapes) if s in recs]
            pts = [(j + (i - (len(labels) - 1) / 2) * width, y) for j, y in pts if y is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.bar(xs, ys, width, label=label, color="black" if label == "HBM floor" else None)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize="small")
        ax.set_yscale("log")
        ax.set_ylabel("ms (log scale)")
        ax.set_title(f"{pass_}: {report['environment']['device_name']}, {cfg['dtype']}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attnhub bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (default: all)")
    p.add_argument("--shape", action="append", default=[], help="a shape name or custom:B,H,N,D,P,grid (repeatable)")
    p.add_argument("--passes", default=",".join(PASSES), help="comma list of fwd, fwdbwd")
    p.add_argument("--impls", default=None, help="comma list (default: attnhub backends available + baselines)")
    p.add_argument("--with-math", action="store_true", help="include attnhub:math in the default implementations")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--warmup", type=int, default=50, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time, ms")
    p.add_argument("--overhead-calls", type=int, default=2000, help="calls timed for the dispatch overhead")
    p.add_argument("--out", default=None, help="write the JSON report here (e.g. benchmarks/results/h100.json)")
    p.add_argument("--plot", default=None, help="write a bar chart PNG here")
    p.add_argument("--no-progress", action="store_true")
    return p


def _known_impl(name: str) -> bool:
    return name in BASELINES or (name.startswith("attnhub:") and name.partition(":")[2] in REGISTRY.specs())


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run, write --out and --plot, print the tables. Returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    try:
        names = [*(args.shapes.split(",") if args.shapes else []), *args.shape] or list(SHAPES)
        shapes = [parse_shape(n) for n in names]
    except ValueError as exc:
        parser.error(str(exc))
    passes = tuple(args.passes.split(","))
    if not set(passes) <= set(PASSES):
        parser.error(f"--passes: expected a comma list of {list(PASSES)}, got {args.passes!r}")
    impls = args.impls.split(",") if args.impls else None
    unknown = [i for i in impls or () if not _known_impl(i)]
    if unknown:
        known = [f"attnhub:{n}" for n in REGISTRY.specs()] + list(BASELINES)
        parser.error(f"--impls: unknown {unknown}; known: {known}")
    report = run(shapes, passes, impls, dtype=DTYPES[args.dtype], device=args.device, warmup=args.warmup,
                 rep=args.rep, with_math=args.with_math, overhead_calls=args.overhead_calls,
                 progress=not args.no_progress)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        log.info("wrote %s", args.out)
    if args.plot:
        plot(report, args.plot)
        log.info("wrote %s", args.plot)
    print_tables(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
