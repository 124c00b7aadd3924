"""The kernel benchmark's `first_call` and `host` sections (`python -m attnhub bench --sections first_call,host`):
what a call costs besides its kernels. First calls run in fresh processes (cold and warm Triton cache); host time
and the dispatch overhead are measured at the tiny shape, where the device work is negligible.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import attnhub
from attnhub import benchkit
from attnhub.benchkit import PASSES, TINY, Shape, error_text
from attnhub.registry import REGISTRY


# ------------------------------------------------------------------------------------------------ first call
def _first_call_child(payload: str) -> None:
    """In a fresh process: the first forward and backward of `backend` on each shape in turn, then the wait for
    kernels they left compiling in the background (background_s); prints one JSON line.

    Later shapes reuse the kernels of earlier ones unless a compile-time specialization differs.
    """
    spec = json.loads(payload)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    torch.ones(1, device=device)  # the CUDA context, outside the timings
    rows = []
    for fields in spec["shapes"]:
        s = Shape(**fields)
        x = benchkit.inputs(s, device, dtype)
        q, k, v = (x[n].requires_grad_() for n in "qkv")
        table = benchkit.rope_table(s, device)
        benchkit.sync(device)
        start = time.perf_counter()
        o = attnhub.attention(q, k, v, rope=table, backend=spec["backend"])
        benchkit.sync(device)
        mid = time.perf_counter()
        o.backward(x["do"])
        benchkit.sync(device)
        end = time.perf_counter()
        attnhub.wait_for_compiles()
        rows.append({"shape": s.name, "fwd_s": mid - start, "bwd_s": end - mid,
                     "background_s": time.perf_counter() - end})
    print("RESULT " + json.dumps(rows))


def first_call(backends: list[str], shapes: list[Shape], device: torch.device, dtype: torch.dtype,
               timeout: float = 300) -> dict:
    """{backend: {"cold": rows, "warm": rows}} (or {"error"}), each row a shape's first fwd_s and bwd_s.

    Each backend runs in two fresh processes sharing one Triton cache folder: the first finds it empty (cold),
    the second finds what the first compiled (warm). The environment passes through, so
    ATTNHUB_TRITON_COMPILE_AHEAD=0 measures the first call without compiling ahead, and
    ATTNHUB_TRITON_BACKGROUND_COMPILE=0 with the Gluon forwards compiled in the call.
    """
    payload = {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "shapes": [dataclasses.asdict(s) for s in shapes]}
    code = "import sys; from attnhub._bench_calls import _first_call_child; _first_call_child(sys.argv[1])"
    out = {}
    for backend in backends:
        rec = out[backend] = {}
        with tempfile.TemporaryDirectory(prefix="attnhub_triton_cache_") as cache:
            env = {**os.environ, "TRITON_CACHE_DIR": cache}
            for label in ("cold", "warm"):
                arg = json.dumps({**payload, "backend": backend})
                try:
                    proc = subprocess.run([sys.executable, "-c", code, arg], env=env, capture_output=True, text=True,
                                          timeout=timeout)
                except subprocess.TimeoutExpired:
                    rec[label] = {"error": f"timed out after {timeout:g} s"}
                    continue
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()
                    rec[label] = {"error": (tail[-1] if tail else f"exit status {proc.returncode}")[:300]}
                else:
                    rec[label] = json.loads(lines[-1][len("RESULT "):])
    return out


# ------------------------------------------------------------------------------------------------------ host
def host(backends: list[str], device: torch.device, dtype: torch.dtype, calls: int = 2000) -> dict:
    """Host µs per cached call at the tiny shape, and the dispatch overhead.

    Returns {"shape", "us": {impl: {"fwd", "fwdbwd"}}, "errors": {impl pass: error}, "dispatch_overhead": {...}}.
    `impl` is attnhub:<backend> or sdpa (F.scaled_dot_product_attention, default kernel choice, no RoPE).
    """
    x = benchkit.inputs(TINY, device, dtype)
    q, k, v, do = x["q"], x["k"], x["v"], x["do"]
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    table = benchkit.rope_table(TINY, device)
    calls_by = {}
    for name in backends:
        calls_by[f"attnhub:{name}"] = {
            "fwd": lambda name=name: attnhub.attention(q, k, v, rope=table, backend=name),
            "fwdbwd": lambda name=name: attnhub.attention(qg, kg, vg, rope=table, backend=name).backward(do)}
    calls_by["sdpa"] = {"fwd": lambda: F.scaled_dot_product_attention(q, k, v),
                        "fwdbwd": lambda: F.scaled_dot_product_attention(qg, kg, vg).backward(do)}
    us, errors = {impl: {} for impl in calls_by}, {}
    for pass_ in PASSES:
        runnable = {}
        for impl, fns in calls_by.items():
            try:
                fns[pass_]()  # the first call, compilation included, is not timed
                runnable[impl] = fns[pass_]
            except Exception as exc:  # noqa: BLE001 - e.g. a backend without backward
                errors[f"{impl} {pass_}"] = error_text(exc)
        for impl, t in zip(runnable, benchkit.host_us(list(runnable.values()), calls, device)):
            us[impl][pass_] = t
    return {"shape": str(TINY), "calls": calls, "us": us, "errors": errors,
            "dispatch_overhead": dispatch_overhead(backends, device, dtype, calls)}


def dispatch_overhead(backends: list[str], device: torch.device, dtype: torch.dtype, calls: int = 2000) -> dict:
    """µs per call of `attnhub.attention` (cached decision) minus the backend's entry function called directly.

    At the tiny shape the device work is negligible, so both loops measure host time. "auto" is the call without
    `backend=`, against the entry of the backend it chooses; "noop" the same through a no-op backend.
    """
    x = benchkit.inputs(TINY, device, dtype)
    q, k, v = x["q"], x["k"], x["v"]
    table = benchkit.rope_table(TINY, device)
    scale = TINY.D**-0.5
    out = {}
    for name in [*backends, None]:
        try:
            chosen = name or attnhub.explain(q, k, v, table).chosen
            entry = REGISTRY.entry(chosen)
            via, direct = benchkit.host_us([lambda: attnhub.attention(q, k, v, rope=table, backend=name),
                                            lambda: entry(q, k, v, table, scale)], calls, device)
            out[name or "auto"] = {"backend": chosen, "attention_us": via, "entry_us": direct,
                                   "overhead_us": via - direct}
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
            out[name or "auto"] = {"error": error_text(exc)}
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
        others = [n for n in REGISTRY.specs() if n != "_bench_noop"]  # else a measured winner may be chosen
        with attnhub.disable_backends(*others):
            via, direct = benchkit.host_us([lambda: attnhub.attention(q, k, v, rope=table),
                                            lambda: noop(q, k, v, table, 0.125)], calls, device)
    finally:
        REGISTRY.restore(snapshot)
    return {"backend": "_bench_noop", "attention_us": via, "entry_us": direct, "overhead_us": via - direct}
