"""Sweep one field of triton_fa_rope's config table over candidate values: error and time per shape and pass.

    python benchmarks/sweep.py --field fwd                                  # the default candidates of `fwd`
    python benchmarks/sweep.py --field dkdv --values "32,128,4,2 64,64,4,2" --shapes vit_s16_224,vit_b16_512_reg4
    python benchmarks/sweep.py --field prerotate_from_n --values "none 0 384" --set narrow_tail=true
    python benchmarks/sweep.py --field bwd_fused_max_n --values "0 100000"  # split against fused backward

Each value is applied through the table's public form, `configs.override(**{field: value})`
(`attnhub.backends.triton_fa_rope.configs`; fields and their meaning: `configs.ArchConfigs`); `--set` fixes other
fields for the whole sweep. A value is `block_m,block_n,num_warps,num_stages[,maxnreg]` (a `KernelConfig`), an int,
`none` or `true`/`false`. For every shape and value: the relative L2 error of o, dq, dk, dv against `math` in
float64 on the first two images (a value over the bounds of `attnhub.tolerances` is not timed), then the median
ms of each pass (fwd: an inference forward; fwdbwd: forward and backward) through `attnhub.attention`, timed by
`attnhub.benchkit.time_ms`. A value that fails to compile (e.g. more shared memory than the GPU has) is recorded.
Prints one table per shape, fastest first; --out writes the JSON (environment, config, rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

import attnhub
from attnhub import benchkit
from attnhub.backends.triton_fa_rope import configs

K = configs.KernelConfig
# Default candidates per field, from the H100 sweeps of the shipped Hopper table (benchmarks/README.md).
CANDIDATES = {
    "fwd": [K(64, 32, 4, 3), K(64, 64, 4, 2), K(64, 64, 4, 3), K(128, 32, 4, 2), K(128, 32, 8, 3), K(128, 64, 4, 2),
            K(128, 64, 4, 3), K(128, 64, 8, 2), K(128, 128, 8, 3), K(256, 32, 8, 2), K(256, 64, 8, 2),
            K(256, 64, 8, 3)],
    "dkdv": [K(32, 64, 4, 2), K(32, 64, 4, 3), K(64, 64, 4, 2), K(64, 64, 4, 3), K(32, 128, 4, 2), K(32, 128, 4, 3),
             K(64, 128, 8, 2), K(32, 128, 8, 2), K(64, 128, 8, 3), K(128, 64, 8, 2)],
    "dq": [K(64, 64, 4, 2), K(64, 64, 4, 3), K(128, 64, 8, 2), K(128, 64, 8, 3), K(128, 64, 8, 3, 128), K(64, 32, 4, 2),
           K(128, 32, 8, 2), K(64, 128, 4, 2), K(128, 128, 8, 2)],
    # block_m 256: every query of N <= 256 in one block (the short-sequence path)
    "bwd_fused": [K(256, 64, 8, 1), K(256, 64, 8, 2), K(256, 32, 8, 2), K(256, 16, 8, 1), K(128, 64, 8, 2),
                  K(128, 128, 8, 1)],
    "prerotate_from_n": [None, 0, 384],
    "prerotate_train_from_n": [None, 0, 384],
    "narrow_tail": [False, True],
    "prerotate_q_from_n": [None, 0, 641],
    "delta_in_dq": [False, True],
    "bwd_fused_max_n": [0, 2**31 - 1],
    "long_early_release": [False, True],  # with --set long_attend_groups=0 (groups need it)
    "gluon_long_from_n": [257, 128],  # at N <= 256 the resident Gluon forward, or the long one
    "long_attend_groups": [0, 3],  # the long kernel's attending warpgroups: one partition, or each its own
    "long_swap_tail": [False, True],  # with --set long_attend_groups=3: the last slice of <= 16 rows swapped
    # the Gluon backward's (from 257 tokens): the shipped one first, then those that compile without spills at 1029
    # tokens (sm_90, Triton 3.6, offline; the shipped dK/dV spills 12 bytes at its cap of 168 registers)
    "gluon_dkdv": [K(64, 64, 4, 2, 168), K(64, 64, 4, 3, 168), K(64, 64, 4, 2), K(64, 128, 8, 2), K(64, 128, 8, 3)],
    "gluon_dq": [K(64, 64, 4, 2, 168), K(64, 64, 4, 3, 168), K(128, 64, 8, 2), K(128, 64, 8, 3), K(128, 128, 8, 2)],
}
CANDIDATES["fwd_train"] = CANDIDATES["fwd_train_prerotated"] = CANDIDATES["fwd_prerotated"] = CANDIDATES["fwd"]
PASSES = ("fwd", "fwdbwd")
DEFAULT_SHAPES = ("vit_s16_224", "vit_b16_384")  # N = 197 (RoPE in the kernel) and N = 577 (rotated first)


def parse_value(text: str):
    """`128,64,4,3` -> KernelConfig, `none` -> None, `true`/`false` -> bool, else int."""
    low = text.strip().lower()
    if "," in low:
        return K(*(int(x) for x in low.split(",")))
    if low in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[low]
    return int(low)


def _label(value) -> str:
    return ",".join(str(x) for x in value if x is not None) if isinstance(value, tuple) else str(value)


def measure(s: benchkit.Shape, backend: str, passes: tuple[str, ...], device: torch.device, dtype: torch.dtype,
            warmup: int, rep: int, timer: str = "wall") -> dict:
    """Errors (first two images, against float64 math) and, when within bounds, the ms of each pass: the median
    wall time per call (timer "wall", `benchkit.time_ms`) or the GPU kernels' summed time ("gpu",
    `benchkit.gpu_ms`: host overhead excluded, for shapes where the wall time measures the host)."""
    table = benchkit.rope_table(s, device)
    x = benchkit.inputs(s, device, dtype)
    rec: dict = {}
    try:
        few = {n: t[:2] for n, t in x.items()}
        q, k, v = (few[n].clone().requires_grad_() for n in "qkv")
        o = attnhub.attention(q, k, v, rope=table, backend=backend)
        o.backward(few["do"])
        rec["rel_l2"] = benchkit.errors([o, q.grad, k.grad, v.grad], benchkit.reference(few, table, backward=True))
        rec["ok"] = benchkit.within_bounds(rec["rel_l2"], dtype)
        if not rec["ok"]:
            return rec
        q, k, v = (x[n] for n in "qkv")
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        calls = {"fwd": (lambda: attnhub.attention(q, k, v, rope=table, backend=backend), None),
                 "fwdbwd": (lambda: attnhub.attention(qg, kg, vg, rope=table, backend=backend).backward(x["do"]),
                            [qg, kg, vg])}
        if timer == "gpu":
            rec["ms"] = {p: benchkit.gpu_ms(calls[p][0], device=device, grads=calls[p][1]) for p in passes}
        else:
            rec["ms"] = {p: benchkit.time_ms(calls[p][0], device=device, warmup=warmup, rep=rep,
                                             grads=calls[p][1]) for p in passes}
    except Exception as exc:  # noqa: BLE001 - a value that does not compile or run is a result too
        rec["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        rec["ok"] = False
    return rec


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    names = [*(args.shapes.split(",") if args.shapes else []), *args.shape] or list(DEFAULT_SHAPES)
    shapes = [benchkit.parse_shape(n) for n in names]
    passes = tuple(p for p in args.passes.split(",") if p)
    fixed = dict(args.set)
    values = [parse_value(v) for v in args.values.split()] if args.values else CANDIDATES[args.field]
    rows = []
    for s in shapes:
        shipped = getattr(configs.for_call(device, s.D), args.field)
        for value in values:
            with configs.override(**{**fixed, args.field: value}):
                rec = {"shape": s.name, "value": value, "shipped": value == shipped,
                       **measure(s, args.backend, passes, device, dtype, args.warmup, args.rep, args.timer)}
            rows.append(rec)
            shown = rec.get("ms") or rec.get("error") or f"wrong: {rec.get('rel_l2')}"
            print(f"  {s.name} {args.field}={_label(value)}: {shown}", file=sys.stderr, flush=True)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": benchkit.environment(device),
        "config": {"backend": args.backend, "field": args.field, "values": values, "set": fixed,
                   "shapes": [s.name for s in shapes], "passes": list(passes), "dtype": args.dtype,
                   "warmup_ms": args.warmup, "rep_ms": args.rep, "timer": args.timer,
                   "reference": "math, float64, first two images"},
        "rows": rows,
    }


def print_table(report: dict) -> None:
    cfg = report["config"]
    passes = cfg["passes"]
    key = passes[-1]  # fwdbwd when timed: the pass a training step runs
    for shape in cfg["shapes"]:
        rows = [r for r in report["rows"] if r["shape"] == shape]
        rows.sort(key=lambda r: r["ms"][key] if "ms" in r else float("inf"))
        print(f"\n{shape}: {cfg['field']} ({report['environment']['device_name']}, {cfg['dtype']}, "
              f"{cfg.get('timer', 'wall')} ms, sorted by {key}; * = the table's value)")
        print(f"  {'value':<18} " + " ".join(f"{p:>9}" for p in passes) + "  max rel_l2")
        for r in rows:
            errs = [e for e in (r.get("rel_l2") or {}).values() if e is not None]
            cells = " ".join(f"{r['ms'][p]:9.4f}" for p in passes) if "ms" in r else r.get("error", "wrong")[:60]
            mark = "*" if r["shipped"] else " "
            print(f"{mark} {_label(r['value']):<18} {cells}  {max(errs):.1e}" if errs else
                  f"{mark} {_label(r['value']):<18} {cells}")


def config_setting(text: str) -> tuple[str, object]:
    """`FIELD=VALUE` -> (field, `parse_value(VALUE)`): argparse's type of `--set` (here and in bench_varlen.py)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return name, parse_value(value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--field", required=True, choices=sorted(CANDIDATES), help="the config field to sweep")
    p.add_argument("--values", default=None, help="space-separated values (default: the field's candidates)")
    p.add_argument("--set", type=config_setting, action="append", default=[], help="FIELD=VALUE fixed for the whole sweep")
    p.add_argument("--shapes", default=None, help=f"comma list of attnhub.benchkit shape names (default: "
                   f"{','.join(DEFAULT_SHAPES)})")
    p.add_argument("--shape", action="append", default=[], help="a shape name or custom:B,H,N,D,P,grid (repeatable)")
    p.add_argument("--passes", default=",".join(PASSES), help="comma list of fwd, fwdbwd")
    p.add_argument("--backend", default="triton_fa_rope")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--timer", default="wall", choices=["wall", "gpu"],
                   help="wall: median ms per call (do_bench); gpu: the kernels' summed time (torch.profiler)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not set(args.passes.split(",")) <= set(PASSES):
        parser.error(f"--passes: expected a comma list of {list(PASSES)}, got {args.passes!r}")
    try:
        report = run(args)
    except (TypeError, ValueError) as exc:  # an unknown field of --set, a malformed value, an unknown shape
        parser.error(str(exc))
    print_table(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
