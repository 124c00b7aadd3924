"""Kernel benchmark: every available attnhub backend against timm's RoPE attention, SDPA without RoPE, the HBM floor.

    python -m attnhub bench --out benchmarks/results/h100.json --plot benchmarks/results/h100.png

Shapes, timer, error measure and environment record come from `attnhub.benchkit` (method:
benchmarks/README.md). All implementations run in one process on one device:
  attnhub                  attnhub.attention(q, k, v, rope=table): the automatic choice (the primary)
  attnhub:<backend>        attnhub.attention(q, k, v, rope=table, backend=<backend>), for every registered backend
                           that can run the call here (a new backend appears without changes here)
  timm_eager               timm's RoPE path: apply_rot_embed_cat on q and k after the prefix tokens, then SDPA
  timm_compiled            the same function under torch.compile (default mode)
  sdpa_flash, sdpa_cudnn   F.scaled_dot_product_attention forced to that kernel, WITHOUT RoPE
Sections (`--sections`; first_call and host are in `attnhub._bench_calls`):
  table       per shape and pass (fwd; fwdbwd: o.backward(do), q, k, v grads reset every repetition) the median ms;
              before timing, each implementation's first call in this process (s) and the relative L2 error of
              its o, dq, dk, dv against `math` in float64: one over the bound of attnhub.tolerances is not timed
  first_call  each attnhub backend's first fwd and bwd per shape in a fresh process with an empty Triton cache
              (cold: compilation included), then in a second process on that cache (warm: Triton's disk cache)
  host        at the tiny shape (device work negligible) host µs per cached fwd and fwd+bwd of each attnhub
              backend and of F.scaled_dot_product_attention, and the dispatch overhead: attnhub.attention minus the
              backend's entry called directly (also through a registered no-op backend)
The JSON report (`--out`): date, environment, config, copy_bandwidth_gbs, shapes, results (per shape and pass: ms,
errors, floor_ms, pct_of_floor, ratios of the primary implementation), checks (per shape and implementation:
first_call_s, rel_l2 of o/dq/dk/dv, ok, error), first_call, host.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

import attnhub
from attnhub import benchkit
from attnhub._bench_calls import first_call, host
from attnhub._bench_report import plot, print_tables, winners
from attnhub.benchkit import PASSES, TINY, VIT_SHAPES, Shape, error_text, parse_shape
from attnhub.registry import REGISTRY

log = logging.getLogger(__name__)

SECTIONS = ("table", "first_call", "host")
BASELINES = ("timm_eager", "timm_compiled", "sdpa_flash", "sdpa_cudnn")
RATIO_VS = ("sdpa_cudnn", "timm_compiled")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# [B, H, N, D] tensors that must cross HBM at least once. fwd: read q, k, v, write o. The backward reads q, k,
# v, o, dO and writes dq, dk, dv (the reading of ANCHORS.md's floor figures: 12 tensors for fwd+bwd).
TENSORS_MOVED = {"fwd": 4, "fwdbwd": 12}


@dataclasses.dataclass
class Impl:
    fn: Callable  # (q, k, v) -> o, all [B, H, N, D]
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around every call (SDPA forcing)
    rope: bool = True  # computes RoPE attention, so it is checked against the reference


# ------------------------------------------------------------------------------------------- implementations
def build(impl: str, s: Shape, device: torch.device) -> Impl:
    """The callable of implementation `impl` for shape `s` (its RoPE table built here, outside the timing)."""
    if impl == "attnhub" or impl.startswith("attnhub:"):
        backend = impl.partition(":")[2] or None
        table = benchkit.rope_table(s, device)
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


def _probe(device: torch.device, dtype: torch.dtype) -> attnhub.Explanation:
    x = torch.empty(1, 1, TINY.N, TINY.D, device=device, dtype=dtype)
    return attnhub.explain(x, x, x, benchkit.rope_table(TINY, device))


def default_impls(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Every registered attnhub backend that can run RoPE attention of `dtype` on `device`, then the baselines
    (on CPU only timm_eager)."""
    names = [f"attnhub:{n}" for n, why in _probe(device, dtype).reasons.items() if not why]
    return ["attnhub", *names] + list(BASELINES if device.type == "cuda" else ("timm_eager",))


# ----------------------------------------------------------------------------------------------------- table
def copy_bandwidth(device: torch.device, timer: Callable) -> float:
    """Device-to-device copy bandwidth `dst.copy_(src)` in GB/s, counting the bytes read and written."""
    n = 2**28 if device.type == "cuda" else 2**24  # float32: 1 GiB per tensor on CUDA, far beyond L2
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n * src.element_size() / (ms * 1e-3) / 1e9


def _qkv(x: dict, backward: bool) -> tuple[torch.Tensor, ...]:
    """(qkv, q, k, v): q, k, v [B, H, N, D] as views of one fused projection qkv [B, N, 3, H, D], the layout timm's
    attention modules hand over; qkv is the leaf that gradients reach."""
    qkv = torch.stack([x[n] for n in "qkv"]).permute(1, 3, 0, 2, 4).contiguous().requires_grad_(backward)
    return (qkv, *qkv.permute(2, 0, 3, 1, 4).unbind(0))


def _grad_like(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """do laid out like o in memory, as the layer after attention hands it back (and as torch.compile's backward
    expects: torch 2.11's Inductor computed wrong gradients from a tangent of other strides here)."""
    return torch.empty_like(o).copy_(do)


def _first_call(impl: Impl, x: dict, backward: bool, device: torch.device) -> tuple[list, float]:
    """One call on fresh inputs -> ([o, dq, dk, dv] (grads None without backward), wall seconds)."""
    _, q, k, v = _qkv(x, backward)
    benchkit.sync(device)
    start = time.perf_counter()
    with impl.context():
        o = impl.fn(q, k, v)
        grads = torch.autograd.grad(o, (q, k, v), _grad_like(o, x["do"])) if backward else (None,) * 3
    benchkit.sync(device)
    return [o.detach(), *grads], time.perf_counter() - start


def _time_pass(impl: Impl, x: dict, pass_: str, timer: Callable) -> float:
    backward = pass_ == "fwdbwd"
    qkv, q, k, v = _qkv(x, backward)
    if backward:
        with impl.context(), torch.no_grad():
            do = _grad_like(impl.fn(q, k, v), x["do"])
        fn = lambda: impl.fn(q, k, v).backward(do)  # noqa: E731
    else:
        fn = lambda: impl.fn(q, k, v)  # noqa: E731
    with impl.context():
        return timer(fn, grads=[qkv] if backward else None)


def _check_shape(s: Shape, built: dict, x: dict, backward: bool, device: torch.device) -> dict:
    """First call of every implementation (wall s, this process) and, for the RoPE ones, the relative L2 errors
    of o, dq, dk, dv against `math` in float64, of a second call after `attnhub.wait_for_compiles` (the kernels
    then timed; the first call may be served while they compile in the background).

    Returns {impl: {"first_call_s", "rel_l2": {o, dq, dk, dv}, "ok", "error"}}.
    """
    ref = benchkit.reference(x, benchkit.rope_table(s, device), backward)
    dtype = x["q"].dtype
    out = {}
    for name, impl in built.items():
        try:
            _, seconds = _first_call(impl, x, backward, device)
            attnhub.wait_for_compiles()
            got, _ = _first_call(impl, x, backward, device)  # the kernels the timings see, not those serving meanwhile
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            out[name] = {"error": error_text(exc), "ok": False}
            continue
        rec = out[name] = {"first_call_s": seconds, "ok": True}
        if impl.rope:
            rec["rel_l2"] = benchkit.errors(got, ref)
            rec["ok"] = benchkit.within_bounds(rec["rel_l2"], dtype)
            if not rec["ok"]:
                errs = ", ".join(f"{n} {e:.1e}" for n, e in rec["rel_l2"].items() if e is not None)
                rec["error"] = f"wrong: relative L2 error against float64 math over attnhub.tolerances ({errs})"
    return out


def kernel_table(shapes: list[Shape], passes: tuple[str, ...], impls: list[str], primary: str | None,
                 dtype: torch.dtype, device: torch.device, timer: Callable, bandwidth: float,
                 progress: bool) -> tuple[list, dict]:
    """(results, checks): the timed cells per shape and pass, and the first calls and errors per shape."""
    from tqdm.auto import tqdm

    results, checks = [], {}
    bar = tqdm(total=len(shapes) * (1 + len(passes) * len(impls)), desc="bench", disable=not progress, leave=False)
    for s in shapes:
        torch.compiler.reset()  # one static graph per shape; also keeps torch.compile under its recompile limit
        x = benchkit.inputs(s, device, dtype)
        built, skip = {}, {}
        for name in impls:
            try:
                built[name] = build(name, s, device)
            except Exception as exc:  # noqa: BLE001 - e.g. timm not installed
                skip[name] = error_text(exc)
        bar.set_postfix_str(f"{s.name} first calls and check")
        checks[s.name] = _check_shape(s, built, x, "fwdbwd" in passes, device)
        skip.update({n: c["error"] for n, c in checks[s.name].items() if not c["ok"]})
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
                        rec["errors"][name] = error_text(exc)
                bar.update()
            ms = rec["ms"]
            rec["pct_of_floor"] = {n: 100 * rec["floor_ms"] / t for n, t in ms.items()}
            rec["ratios"] = {o: ms[primary] / ms[o] for o in RATIO_VS if primary in ms and o in ms}
            backend_ms = [t for n, t in ms.items() if n.startswith("attnhub:")]
            if primary in ms and backend_ms:  # the automatic choice against the fastest backend forced
                rec["ratios"]["fastest_backend"] = ms[primary] / min(backend_ms)
            results.append(rec)
        del x, built
    bar.close()
    return results, checks


# ------------------------------------------------------------------------------------------------------- run
def run(
    shapes: list[Shape],
    passes: tuple[str, ...] = PASSES,
    impls: list[str] | None = None,
    *,
    sections: tuple[str, ...] = SECTIONS,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    warmup: int = 50,
    rep: int = 200,
    host_calls: int = 2000,
    progress: bool = True,
) -> dict:
    """Measure the `sections` for every (shape, pass, implementation); returns the report (JSON-serializable)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    impls = list(impls or default_impls(device, dtype))
    backends = [i.partition(":")[2] for i in impls if i.startswith("attnhub:")]
    primary = next((i for i in impls if i == "attnhub" or i.startswith("attnhub:")), None)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": benchkit.environment(device),
        "config": {"dtype": str(dtype).replace("torch.", ""), "sections": list(sections), "warmup_ms": warmup,
                   "rep_ms": rep, "timer": "triton.testing.do_bench median" if device.type == "cuda" else
                   "perf_counter median", "passes": list(passes), "impls": impls, "primary": primary,
                   "ratios_vs": [*RATIO_VS, "fastest_backend"],
                   "reference": "math, float64", "tolerance": "attnhub.tolerances",
                   "tensors_moved": TENSORS_MOVED,
                   "compile_ahead_env": os.environ.get("ATTNHUB_TRITON_COMPILE_AHEAD"),
                   "background_compile_env": os.environ.get("ATTNHUB_TRITON_BACKGROUND_COMPILE")},
        "shapes": {s.name: dataclasses.asdict(s) for s in shapes},
    }
    if "table" in sections:
        def timer(fn, grads=None):
            return benchkit.time_ms(fn, device=device, warmup=warmup, rep=rep, grads=grads)

        report["copy_bandwidth_gbs"] = bandwidth = copy_bandwidth(device, timer)
        log.info("device-to-device copy: %.0f GB/s", bandwidth)
        report["results"], report["checks"] = kernel_table(shapes, passes, impls, primary, dtype, device, timer,
                                                           bandwidth, progress)
    if "first_call" in sections:
        log.info("first calls in fresh processes: %s", ", ".join(backends))
        report["first_call"] = first_call(backends, shapes, device, dtype)
    if "host" in sections:
        report["host"] = host(backends, device, dtype, host_calls)
    return report


# ------------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m attnhub bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help=f"comma list of {list(VIT_SHAPES)} (default: all)")
    p.add_argument("--shape", action="append", default=[], help="a shape name or custom:B,H,N,D,P,grid (repeatable)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--passes", default=",".join(PASSES), help="comma list of fwd, fwdbwd")
    p.add_argument("--impls", default=None, help="comma list (default: every attnhub backend available + baselines)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--warmup", type=int, default=50, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time, ms")
    p.add_argument("--host-calls", type=int, default=2000, help="calls timed per host measurement")
    p.add_argument("--out", default=None, help="write the JSON report here (e.g. benchmarks/results/h100.json)")
    p.add_argument("--plot", default=None, help="write a bar chart PNG here (needs the table section)")
    p.add_argument("--winners", default=None, help="write the measured winners of the table section here "
                   "(measured.yaml: what the automatic choice follows on this GPU architecture)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _known_impl(name: str) -> bool:
    return name in BASELINES or name == "attnhub" or (name.startswith("attnhub:")
                                                       and name.partition(":")[2] in REGISTRY.specs())


def _csv(value: str, allowed: tuple[str, ...], flag: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    items = tuple(v for v in value.split(",") if v)
    if not items or not set(items) <= set(allowed):
        parser.error(f"{flag}: expected a comma list of {list(allowed)}, got {value!r}")
    return items


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, run, write --out and --plot, print the tables. Returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    try:
        names = [*(args.shapes.split(",") if args.shapes else []), *args.shape] or list(VIT_SHAPES)
        shapes = [parse_shape(n) for n in names]
    except ValueError as exc:
        parser.error(str(exc))
    sections = _csv(args.sections, SECTIONS, "--sections", parser)
    passes = _csv(args.passes, PASSES, "--passes", parser)
    if (args.plot or args.winners) and "table" not in sections:
        parser.error("--plot: the plot shows the table section; add it to --sections")
    impls = args.impls.split(",") if args.impls else None
    unknown = [i for i in impls or () if not _known_impl(i)]
    if unknown:
        known = [f"attnhub:{n}" for n in REGISTRY.specs()] + list(BASELINES)
        parser.error(f"--impls: unknown {unknown}; known: {known}")
    report = run(shapes, passes, impls, sections=sections, dtype=DTYPES[args.dtype], device=args.device,
                 warmup=args.warmup, rep=args.rep, host_calls=args.host_calls, progress=not args.no_progress)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        log.info("wrote %s", args.out)
    if args.winners:
        target = Path(args.winners)
        target.write_text(winners(report, args.out or "an unsaved run",
                                  target.read_text() if target.exists() else None))
        log.info("wrote %s", args.winners)
    if args.plot:
        plot(report, args.plot)
        log.info("wrote %s", args.plot)
    print_tables(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
