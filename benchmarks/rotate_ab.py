"""The rotation pass of triton_fa_rope's forward from 384 tokens (`kernels.rotate_kernel`): q and k in one launch
(each program rotates the same rows of both, one table load) against one launch per tensor, and rows / warps per
program. q, k are views of a fused qkv projection [B, N, 3, H, D], as timm hands them over. Needs CUDA.

    python benchmarks/rotate_ab.py [--shapes vit_b16_384,vit_b16_512_reg4] [--out FILE]

Every variant's rotated q and k are checked bitwise against the per-tensor launches' (outputs NaN-filled first);
then per variant: do_bench ms (L2 flushed before each call), GPU ms by torch.profiler (back to back, as in a model
step), and the HBM floor (q and k read once, written once, at the measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import json

import torch

from attnhub import bench, benchkit
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import launch

VARIANTS = {  # name: (one launch for q and k, rows per program, warps)
    "per tensor, 64 rows, 4 warps": (False, 64, 4),
    "q+k, 64 rows, 4 warps": (True, 64, 4),
    "q+k, 32 rows, 4 warps": (True, 32, 4),
    "q+k, 128 rows, 4 warps": (True, 128, 4),
    "q+k, 128 rows, 8 warps": (True, 128, 8),
}


def rotate(q, k, qr, kr, table, together: bool, rows: int, warps: int) -> None:
    """q, k into qr, kr through the forward's `launch.rotation_pass`: one launch for both or one per tensor."""
    table_args, cx = launch._table_args(table, q), launch.meta(q, table)
    for pairs in [((q, qr), (k, kr))] if together else [((q, qr),), ((k, kr),)]:
        launch.rotation_pass(pairs, table_args, cx, False, runtime.launch, rows, warps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="vit_b16_384,vit_b16_512_reg4")
    p.add_argument("--out")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    bandwidth = bench.copy_bandwidth(dev, lambda fn: benchkit.time_ms(fn, device=dev))
    report = dict(environment=benchkit.environment(dev), copy_gb_s=bandwidth, rows=[])
    for name in args.shapes.split(","):
        s = benchkit.parse_shape(name)
        x = benchkit.inputs(s, dev, torch.bfloat16)
        qkv = torch.stack([x[n] for n in "qkv"]).permute(1, 3, 0, 2, 4).contiguous()  # [B, N, 3, H, D]
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        table = benchkit.rope_table(s, dev)
        floor_ms = 4 * q.numel() * q.element_size() / bandwidth / 1e6
        ref = None
        for variant, (together, rows, warps) in VARIANTS.items():
            qr, kr = (torch.full((s.B, s.H, s.N, s.D), float("nan"), device=dev, dtype=q.dtype) for _ in "qk")
            rotate(q, k, qr, kr, table, together, rows, warps)
            torch.cuda.synchronize()
            if ref is None:
                ref = (qr.clone(), kr.clone())
            same = bool(torch.equal(qr, ref[0]) and torch.equal(kr, ref[1]))
            fn = lambda: rotate(q, k, qr, kr, table, together, rows, warps)  # noqa: E731
            row = dict(shape=s.name, variant=variant, bitwise_equal=same, ms=benchkit.time_ms(fn, device=dev),
                       gpu_ms=benchkit.gpu_ms(fn, device=dev, iters=50), floor_ms=floor_ms)
            report["rows"].append(row)
            print(f"{s.name:<18} {variant:<30} equal={same!s:<5} do_bench {row['ms']:.4f}  GPU {row['gpu_ms']:.4f}"
                  f"  floor {floor_ms:.4f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
