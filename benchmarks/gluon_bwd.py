"""The Gluon kernels of the split backward (`gluon_bwd`; configs `gluon_dkdv`, `gluon_dq`, `gluon_bwd_from_n`)
against Triton's, side by side in one process, with timm compiled and cuDNN (without RoPE) as the kernel table measures
them. Needs a Hopper GPU.

    python benchmarks/gluon_bwd.py [--shapes "vit_b16_384;vit_b16_512_reg4"] [--variants ...] [--host] [--out FILE]

Each shape: q, k, v views of one fused qkv projection, bf16, the timm-convention table, as in the kernel table
(`attnhub.bench`). Per variant ("triton": Triton's backward kernels; "gluon ...": the Gluon ones, configs as named)
the first fwd+bwd call is checked against `math` in float64 with every `torch.empty` buffer NaN-filled (its
kernels' names are recorded), and the script stops at the first wrong one. Then:
    fwdbwd_ms      o.backward(do) through `attnhub.attention`, do_bench median (the kernel table's timer)
    fwdbwd_gpu_ms  the same call's kernel time summed by torch.profiler (host gaps excluded)
    kernels_ms     each kernel's time in that call (dkdv_ms, dq_ms: the dK/dV and dQ kernels')
The last lines are a table with each row's ratio to timm compiled and to cuDNN without RoPE (fwdbwd_ms). --host
adds the host µs per fwd+bwd of each backward path at the tiny shape (`host`).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from attnhub import bench, benchkit
from attnhub.backends.triton_fa_rope import configs
from gluon_train import checked, fwdbwd  # noqa: I001 - benchmarks/, on sys.path when this script runs

K = configs.KernelConfig
VARIANTS = {  # name -> config fields over the Hopper table's
    "triton": dict(gluon_bwd_from_n=None),
    "gluon dkdv": dict(gluon_bwd_from_n=0, gluon_dq=None),
    "gluon dkdv+dq": dict(gluon_bwd_from_n=0),
    "gluon dkdv+dq delta pass": dict(gluon_bwd_from_n=0, delta_in_dq=False),  # the table before delta_in_dq
    "gluon dkdv+dq s3": dict(gluon_bwd_from_n=0, gluon_dkdv=K(64, 64, 4, 3, 168), gluon_dq=K(64, 64, 4, 3)),
    "gluon dkdv+dq w8": dict(gluon_bwd_from_n=0, gluon_dq=K(128, 64, 8, 2, 128)),
    "gluon dkdv+dq dq s4": dict(gluon_bwd_from_n=0, gluon_dq=K(64, 64, 4, 4)),
    "gluon dkdv+dq no fused": dict(gluon_bwd_from_n=0, bwd_fused_max_n=0),  # N <= 256 too
    "gluon dkdv+dq unswapped": dict(gluon_bwd_from_n=0, bwd_swap_tail=False),  # the table before bwd_swap_tail
    # the training forward after the rotation pass: the Gluon forward without RoPE, saving nothing (the table's past
    # 640 tokens), and the kernel's own training form there (the table before gluon_prerotate_train_from_n)
    "gluon dkdv+dq rotate first": dict(gluon_bwd_from_n=0, gluon_prerotate_train_from_n=0),
    "gluon dkdv+dq own training form": dict(gluon_bwd_from_n=0, gluon_prerotate_train_from_n=None),
}


def _timed(impl: bench.Impl, x: dict, dev: torch.device) -> dict:
    """`gluon_train.fwdbwd`, and the dK/dV and dQ kernels' ms (dkdv_ms, dq_ms)."""
    out = fwdbwd(impl, x, dev)
    out["dkdv_ms"] = sum(ms for name, ms in out["kernels_ms"].items() if "dkdv" in name) or None
    out["dq_ms"] = sum(ms for name, ms in out["kernels_ms"].items() if name.startswith(("bwd_dq", "gluon_dq"))) or None
    return out


def run_shape(s: benchkit.Shape, dev: torch.device, variants: dict) -> list[dict]:
    torch.compiler.reset()  # one static graph per shape, as the kernel table compiles timm (no dynamic shapes)
    x = benchkit.inputs(s, dev, torch.bfloat16)
    ref = benchkit.reference(x, benchkit.rope_table(s, dev), backward=True)
    rows = []
    for name, cfg in variants.items():
        impl, errs, launches = checked(s, x, ref, name, cfg, dev)
        rows.append(dict(shape=s.name, impl=f"triton_fa_rope {name}", config=cfg, errors=errs, launches=launches,
                         **_timed(impl, x, dev)))
        print(f"  {s.name} {rows[-1]}", flush=True)
    for impl_name in ("timm_compiled", "sdpa_cudnn"):
        rows.append(dict(shape=s.name, impl=impl_name, **_timed(bench.build(impl_name, s, dev), x, dev)))
        print(f"  {s.name} {impl_name} {rows[-1]['fwdbwd_ms']:.4f}", flush=True)
    return rows


def host(dev: torch.device) -> dict:
    """Host µs per cached fwd+bwd at the tiny shape (1, 1, 17, 64): the fused backward, the split one with Triton's
    kernels and with the Gluon ones (forced at this length), and F.sdpa's."""
    variants = {"fused": dict(gluon_bwd_from_n=None), "split triton": dict(gluon_bwd_from_n=None, bwd_fused_max_n=0),
                "split gluon": dict(gluon_bwd_from_n=0)}
    return benchkit.host_us_fwdbwd({name: lambda f=f: configs.override(**f) for name, f in variants.items()}, dev)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help="semicolon list of shapes (`benchkit.parse_shape`)",
                   default="vit_b16_224;custom:64,12,257,64,1,16;custom:64,12,401,64,1,20;vit_b16_384;vit_b16_512_reg4")
    p.add_argument("--variants", help=f"comma list of {list(VARIANTS)}", default=",".join(VARIANTS))
    p.add_argument("--host", action="store_true", help="also host µs per fwd+bwd at the tiny shape (`host`)")
    p.add_argument("--out", help="write the rows and the environment as JSON")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    env = benchkit.environment(dev)
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}", flush=True)
    host_us = host(dev) if args.host else None
    if host_us:
        print(f"host µs per fwd+bwd at the tiny shape: {host_us}", flush=True)
    rows = []
    for spec in args.shapes.split(";") if args.shapes else ():
        rows += run_shape(benchkit.parse_shape(spec), dev, variants)
    print(f"\n{'shape':<22} {'implementation':<30} {'dkdv':>7} {'dq':>7} {'gpu':>7} {'fwdbwd':>7} {'timm c/it':>9} "
          f"{'cuDNN/it':>9}")
    for r in rows:
        base = {x["impl"]: x["fwdbwd_ms"] for x in rows if x["shape"] == r["shape"]}
        dkdv, dq = (f"{r[key]:.4f}" if r.get(key) else "" for key in ("dkdv_ms", "dq_ms"))
        print(f"{r['shape']:<22} {r['impl']:<30} {dkdv:>7} {dq:>7} "
              f"{r['fwdbwd_gpu_ms']:>7.4f} {r['fwdbwd_ms']:>7.4f} {base['timm_compiled'] / r['fwdbwd_ms']:>9.3f} "
              f"{base['sdpa_cudnn'] / r['fwdbwd_ms']:>9.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(environment=env, host_us=host_us, rows=rows), fh, indent=1, default=str)


if __name__ == "__main__":
    main()
