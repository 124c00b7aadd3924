"""Training through the Gluon forwards (`resident_train_max_n`) against the Triton training forward, side by side
in one process, with timm compiled and cuDNN (without RoPE) as the kernel table measures them. Needs a Hopper GPU.

    python benchmarks/gluon_train.py [--shapes "vit_b16_384;vit_s16_224"] [--out FILE]

Each shape: q, k, v views of one fused qkv projection, bf16, the timm-convention table, as in the kernel table
(`attnhub.bench`). Per variant of `triton_fa_rope` ("triton": the Triton training forward; "gluon": the Gluon
kernel writing the rotated q and k) the first fwd+bwd call is checked against `math` in float64 with every
`torch.empty` buffer NaN-filled (its kernels' names are recorded), and the script stops at the first wrong one.
Then:
    fwd_graph_ms     the training forward alone (`launch.forward` saving what the backward needs), CUDA-graph replay
    fwdbwd_ms        o.backward(do) through `attnhub.attention`, do_bench median (the kernel table's timer)
    fwdbwd_gpu_ms    the same call's kernel time summed by torch.profiler (host gaps excluded)
and at the tiny shape (1, 1, 17, 64) each variant's host µs per fwd+bwd, interleaved loops (`benchkit.host_us`).
The last lines are a table with each row's ratio to timm compiled and to cuDNN without RoPE (fwdbwd_ms).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.testing import do_bench_cudagraph

from attnhub import bench, benchkit
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import configs, gluon_fwd, launch

VARIANTS = {"triton": 0, "gluon": gluon_fwd.STREAM_MAX_N}  # resident_train_max_n (the Gluon forwards: up to 1152)


def fwdbwd(impl: bench.Impl, x: dict, dev: torch.device) -> dict:
    """impl's fwd+bwd as the kernel table times it (`bench._time_pass`, impl's context entered around the timing):
    do_bench ms (fwdbwd_ms), each kernel's ms by the profiler (kernels_ms) and their sum (fwdbwd_gpu_ms)."""
    out = {}

    def timer(measure, key):
        def run(fn, grads=None):
            out[key] = measure(fn, device=dev, grads=grads)
            return 0.0
        return run

    bench._time_pass(impl, x, "fwdbwd", timer(benchkit.time_ms, "fwdbwd_ms"))
    bench._time_pass(impl, x, "fwdbwd", timer(benchkit.gpu_kernels_ms, "kernels_ms"))
    out["fwdbwd_gpu_ms"] = sum(out["kernels_ms"].values())
    return out


def checked(s: benchkit.Shape, x: dict, ref: list, name: str, fields: dict, dev: torch.device):
    """`triton_fa_rope` at shape s under `configs.override(**fields)` (its `context`), once its first fwd+bwd
    matched `ref` (float64 `math`) with every `torch.empty` buffer NaN-filled -> (impl, errors, names of the
    kernels that ran); exits at a wrong one."""
    impl = bench.build("attnhub:triton_fa_rope", s, dev)
    impl.context = lambda: configs.override(**fields)
    with benchkit.nan_empty(), runtime.recording() as launches:
        got, _ = bench._first_call(impl, x, True, dev)
    errs = benchkit.errors(got, ref)
    if not benchkit.within_bounds(errs, torch.bfloat16):
        raise SystemExit(f"{s} {name}: errors {errs} above the bounds")
    return impl, errs, [run.name for run in launches]


def run_shape(s: benchkit.Shape, dev: torch.device) -> list[dict]:
    x = benchkit.inputs(s, dev, torch.bfloat16)
    table = benchkit.rope_table(s, dev)
    ref = benchkit.reference(x, table, backward=True)
    rows = []
    for name, max_n in VARIANTS.items():
        impl, errs, launches = checked(s, x, ref, name, dict(resident_train_max_n=max_n), dev)
        _, q, k, v = bench._qkv(x, False)
        with impl.context():
            config = configs.for_call(dev, s.D)
        fwd = lambda: launch.forward(q, k, v, table, s.D ** -0.5, True, config)  # noqa: E731
        rows.append(dict(shape=s.name, impl=f"triton_fa_rope {name}", errors=errs, launches=launches,
                         fwd_graph_ms=do_bench_cudagraph(fwd, rep=100, return_mode="median"), **fwdbwd(impl, x, dev)))
        print(f"  {s.name} {rows[-1]}", flush=True)
    for impl_name in ("timm_compiled", "sdpa_cudnn"):
        rows.append(dict(shape=s.name, impl=impl_name, **fwdbwd(bench.build(impl_name, s, dev), x, dev)))
        print(f"  {s.name} {rows[-1]}", flush=True)
    return rows


def host(dev: torch.device) -> dict:
    """Host µs per cached fwd+bwd at the tiny shape, each variant, and F.sdpa's."""
    return benchkit.host_us_fwdbwd({name: lambda n=n: configs.override(resident_train_max_n=n)
                                    for name, n in VARIANTS.items()}, dev)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help="semicolon list of shapes (`benchkit.parse_shape`)",
                   default="vit_s16_224;vit_b16_224;vit_l16_224;custom:64,12,257,64,1,16;custom:64,12,325,64,1,18;"
                           "custom:64,12,401,64,1,20;vit_b16_384")
    p.add_argument("--out", help="write the rows and the environment as JSON")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    env = benchkit.environment(dev)
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}", flush=True)
    host_us = host(dev)
    print(f"host µs per fwd+bwd at the tiny shape: {host_us}", flush=True)
    rows = []
    for spec in args.shapes.split(";"):
        rows += run_shape(benchkit.parse_shape(spec), dev)
    print(f"\n{'shape':<22} {'implementation':<24} {'fwd graph':>9} {'fwdbwd':>8} {'gpu':>8} {'timm c/it':>9} "
          f"{'cuDNN/it':>9}")
    for r in rows:
        base = {x["impl"]: x["fwdbwd_ms"] for x in rows if x["shape"] == r["shape"]}
        fwd = r.get("fwd_graph_ms")
        print(f"{r['shape']:<22} {r['impl']:<24} {'' if fwd is None else f'{fwd:.4f}':>9} {r['fwdbwd_ms']:>8.4f} "
              f"{r['fwdbwd_gpu_ms']:>8.4f} {base['timm_compiled'] / r['fwdbwd_ms']:>9.3f} "
              f"{base['sdpa_cudnn'] / r['fwdbwd_ms']:>9.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(environment=env, host_us=host_us, rows=rows), fh, indent=1)


if __name__ == "__main__":
    from attnhub import settings

    with settings.override(background_compile=False):  # each kernel timed from its first call (do_bench, graphs)
        main()
