"""triton_fa_rope backward on the lent GPU: the fused one-launch path against the split three-kernel path.

    python benchmarks/bwd_variants.py --out $OUT          # H100, about 3-5 minutes
    python benchmarks/bwd_variants.py --shapes vit_s --no-sweep --no-first-call --out /tmp/bwd

Needs attnhub installed from this working tree (`pip install -e .`); the file benchmarked is printed. For each
shape (bf16, interleaved RoPE table, D = 64):
  check      fused and split dq, dk, dv at B=2 against `math` in float64 (relative L2 < 2e-2) and each other
  fwdbwd     median ms of attnhub.attention(...) + .backward(do) (do_bench, grads set to None between calls)
  bwd        median ms of torch.autograd.grad(o, (q, k, v), do, retain_graph=True) on one saved forward
  bwd_kernel median ms of the launcher `_backward` alone (no autograd)
first_call: wall seconds of the first forward and backward in a fresh process with an empty Triton cache
(compilation included; then again with that cache warm), per path, on a shape no other step uses.
sweep: the fused kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages) over a small grid, bwd_kernel time and
relative L2 against split, for --sweep-shapes; configs that fail to compile are reported with their error.
Paths are switched by assigning the module variable `_BWD_PATH`, configs by editing the module's config table
and clearing the launcher's caches. Prints a table; writes everything to --out/bwd_variants.json.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import triton

import attnhub

T = importlib.import_module("attnhub.backends.triton_fa_rope")

SHAPES = {  # name: (B, H, grid side, prefix tokens, D); N = prefix + side^2
    "vit_s": (256, 6, 14, 1, 64),
    "vit_b224": (256, 12, 14, 1, 64),
    "vit_l224": (128, 16, 14, 1, 64),
    "vit_b384": (64, 12, 24, 1, 64),
    "vit_b512reg4": (32, 12, 32, 5, 64),
}
SWEEP = [(bm, bn, w, s) for (bm, bn), w, s in itertools.product(
    [(64, 64), (128, 64), (64, 128), (128, 128)], [4, 8], [1, 2, 3])]
FIRST_CALL_SHAPE = (3, 5, 13, 1, 64)  # used by no other step
CHECK_BATCH = 2
MAX_REL = 2e-2
DTYPE = torch.bfloat16


def bench(fn, grads=None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make(shape, batch=None):
    B, H, g, P, D = shape
    B = batch or B
    table = attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P, device="cuda")  # interleaved
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, table.seq_len, D, device="cuda", dtype=DTYPE, generator=gen)
                   for _ in range(4))
    return q, k, v, do, table


def set_path(path: str) -> None:
    T._BWD_PATH = path


def grads(q, k, v, do, table, backend="triton_fa_rope"):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = attnhub.attention(q, k, v, table, backend=backend)
    return torch.autograd.grad(o, (q, k, v), do)


def check(shape) -> dict:
    """Relative L2 of fused and split dq, dk, dv against math in float64 (B=2), and of fused against split."""
    q, k, v, do, table = make(shape, CHECK_BATCH)
    ref = grads(*(t.double() for t in (q, k, v, do)), table, backend="math")
    out = {}
    for path in ("fused", "split"):
        set_path(path)
        out[path] = grads(q, k, v, do, table)
    rec = {f"{p}_vs_math": [rel(a, b) for a, b in zip(out[p], ref)] for p in ("fused", "split")}
    rec["fused_vs_split"] = [rel(a, b) for a, b in zip(out["fused"], out["split"])]
    rec["ok"] = max(rec["fused_vs_math"] + rec["split_vs_math"]) < MAX_REL and all(
        bool(torch.isfinite(g).all()) for g in out["fused"])
    return rec


def time_paths(shape) -> dict:
    """Median ms per path: fwdbwd, bwd (autograd.grad on one forward), bwd_kernel (launcher only)."""
    q, k, v, do, table = make(shape)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    o_k, lse, (qr, kr) = T._forward(q.detach(), k.detach(), v.detach(), table, scale, True)
    rec = {}
    for path in ("split", "fused"):
        set_path(path)

        def fwd_bwd():
            attnhub.attention(q, k, v, table, backend="triton_fa_rope").backward(do)

        o = attnhub.attention(q, k, v, table, backend="triton_fa_rope")
        rec[path] = {
            "fwdbwd": bench(fwd_bwd, grads=[q, k, v]),
            "bwd": bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)),
            "bwd_kernel": bench(lambda: T._backward(do, qr, kr, v.detach(), o_k, lse, table, scale)),
        }
        del o
    rec["bwd_speedup"] = rec["split"]["bwd"] / rec["fused"]["bwd"]
    return rec


FIRST_CALL_CODE = r"""
import json, sys, time
import torch, attnhub
B, H, g, P, D = json.loads(sys.argv[1])
table = attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P, device="cuda")
q, k, v = (torch.randn(B, H, table.seq_len, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
do = torch.randn_like(q)
torch.cuda.synchronize()
t0 = time.perf_counter()
o = attnhub.attention(q, k, v, table, backend="triton_fa_rope")
torch.cuda.synchronize()
t1 = time.perf_counter()
o.backward(do)
torch.cuda.synchronize()
t2 = time.perf_counter()
print("RESULT " + json.dumps({"fwd_s": t1 - t0, "bwd_s": t2 - t1, "total_s": t2 - t0}))
"""


def first_call(path: str) -> dict:
    """First fwd + bwd in a fresh process: with an empty Triton cache (cold), then the same cache again (warm)."""
    rec = {}
    with tempfile.TemporaryDirectory(prefix="triton_cache_") as cache:
        env = dict(os.environ, ATTNHUB_TRITON_BWD=path, TRITON_CACHE_DIR=cache)
        for label in ("cold", "warm"):
            r = subprocess.run([sys.executable, "-c", FIRST_CALL_CODE, json.dumps(FIRST_CALL_SHAPE)], env=env,
                               capture_output=True, text=True, timeout=180)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode != 0 or not line:
                rec[label] = {"error": (r.stderr or r.stdout)[-1500:]}
            else:
                rec[label] = json.loads(line[-1][len("RESULT "):])
    return rec


def config_table() -> dict:
    """The config dict the launcher uses for D <= 64 on this GPU (what `_device_configs` returns)."""
    major, _ = torch.cuda.get_device_capability()
    return T._CONFIGS.get((major, 64), T._DEFAULT[64])


def sweep(shape, deadline: float) -> list[dict]:
    """bwd_kernel ms and relative L2 against split for each fused config; restores the table afterwards."""
    q, k, v, do, table = make(shape)
    scale = q.shape[-1] ** -0.5
    o, lse, (qr, kr) = T._forward(q, k, v, table, scale, True)
    set_path("split")
    ref = T._backward(do, qr, kr, v, o, lse, table, scale)
    set_path("fused")
    cfgs = config_table()
    default = cfgs["bwd_fused"]
    rows = []
    try:
        for cfg in SWEEP:
            if time.perf_counter() > deadline:
                rows.append({"cfg": cfg, "skipped": "time budget"})
                continue
            cfgs["bwd_fused"] = cfg
            T._device_configs.cache_clear()
            try:
                got = T._backward(do, qr, kr, v, o, lse, table, scale)
                torch.cuda.synchronize()
                err = max(rel(a, b) for a, b in zip(got, ref))
                ms = bench(lambda: T._backward(do, qr, kr, v, o, lse, table, scale))
                rows.append({"cfg": cfg, "bwd_kernel": ms, "rel_vs_split": err, "default": cfg == default})
            except Exception as exc:  # noqa: BLE001 - a config that does not compile (shared memory) is a result
                rows.append({"cfg": cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            r = rows[-1]
            print(f"  sweep {cfg}: " + (f"{r['bwd_kernel']:.4f} ms rel {r['rel_vs_split']:.1e}" if "bwd_kernel" in r
                                        else r.get("error", r.get("skipped", ""))), flush=True)
    finally:
        cfgs["bwd_fused"] = default
        T._device_configs.cache_clear()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for bwd_variants.json")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--sweep-shapes", default="vit_s,vit_b384")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-first-call", action="store_true")
    ap.add_argument("--budget-s", type=float, default=320.0, help="sweep configs past this many seconds are skipped")
    args = ap.parse_args()
    start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    env = {"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
           "torch": torch.__version__, "triton": triton.__version__, "module": T.__file__,
           "env_ATTNHUB_TRITON_BWD": os.environ.get("ATTNHUB_TRITON_BWD"), "configs": {
               k: v for k, v in config_table().items()}}
    print(json.dumps(env), flush=True)
    result = {"env": env, "shapes": {}, "first_call": {}, "sweep": {}}

    def save():
        (out_dir / "bwd_variants.json").write_text(json.dumps(result, indent=1, default=str))

    for name in args.shapes.split(","):
        shape = SHAPES[name]
        rec = result["shapes"][name] = {"shape": shape}
        for part, fn in (("check", check), ("time", time_paths)):
            try:
                rec[part] = fn(shape)
            except Exception as exc:  # noqa: BLE001 - record and go on to the next measurement
                rec[part] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            print(f"{name} {part}: {json.dumps(rec[part])[:600]}", flush=True)
        save()

    if not args.no_first_call:
        for path in ("fused", "split"):
            result["first_call"][path] = first_call(path)
            print(f"first_call {path}: {json.dumps(result['first_call'][path])[:600]}", flush=True)
        save()

    if not args.no_sweep:
        deadline = start + args.budget_s
        for name in args.sweep_shapes.split(","):
            print(f"sweep {name}", flush=True)
            result["sweep"][name] = sweep(SHAPES[name], deadline)
            save()
    set_path("auto")
    result["wall_s"] = time.perf_counter() - start
    save()

    # ------------------------------------------------------------------------------------------------ table
    print(f"\n{env['gpu']}  torch {env['torch']}  triton {env['triton']}  wall {result['wall_s']:.0f} s")
    print(f"{'shape':<13} {'ok':>3} {'maxrel_f':>8} {'maxrel_s':>8} {'f_vs_s':>8} | "
          f"{'fb_split':>8} {'fb_fused':>8} | {'bwd_split':>9} {'bwd_fused':>9} {'speedup':>7} | "
          f"{'kern_split':>10} {'kern_fused':>10}")
    for name, rec in result["shapes"].items():
        c, t = rec.get("check", {}), rec.get("time", {})
        worst = [max(c.get(key, [float("nan")])) for key in ("fused_vs_math", "split_vs_math", "fused_vs_split")]
        cells = f"{str(c.get('ok', '?'))[:1]:>3} " + " ".join(f"{x:8.1e}" for x in worst)
        if "split" in t:
            s, f = t["split"], t["fused"]
            cells += (f" | {s['fwdbwd']:8.3f} {f['fwdbwd']:8.3f} | {s['bwd']:9.3f} {f['bwd']:9.3f} "
                      f"{t['bwd_speedup']:7.2f} | {s['bwd_kernel']:10.3f} {f['bwd_kernel']:10.3f}")
        else:
            cells += f" | timing error: {t.get('error', '?')[:80]}"
        print(f"{name:<13} {cells}")
    for path, rec in result["first_call"].items():
        print(f"first call {path:<5} " + "  ".join(
            f"{label}: " + (f"fwd {r['fwd_s']:.2f} s bwd {r['bwd_s']:.2f} s total {r['total_s']:.2f} s"
                            if "total_s" in r else "error " + (r["error"].strip().splitlines() or ["?"])[-1][:100])
            for label, r in rec.items()))
    for name, rows in result["sweep"].items():
        ok = sorted((r for r in rows if "bwd_kernel" in r), key=lambda r: r["bwd_kernel"])
        bad = [r for r in rows if "error" in r]
        default = [r for r in rows if r.get("default")]
        print(f"sweep {name}: default " + (f"{default[0]['cfg']} {default[0]['bwd_kernel']:.4f} ms" if default
                                           else "not measured"))
        for r in ok[:6]:
            print(f"  {str(tuple(r['cfg'])):<20} {r['bwd_kernel']:.4f} ms  rel {r['rel_vs_split']:.1e}")
        for r in bad:
            print(f"  failed {tuple(r['cfg'])}: {r['error'][:100]}")
        skipped = [tuple(r["cfg"]) for r in rows if "skipped" in r]
        if skipped:
            print(f"  skipped (time budget): {skipped}")
    print(f"wrote {out_dir / 'bwd_variants.json'}")


if __name__ == "__main__":
    main()
