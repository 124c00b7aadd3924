"""The Gluon forward's RoPE step height, side by side with no RoPE and cuDNN (no RoPE), at the N = 197 shapes.

    python benchmarks/gluon_rope_steps.py --rows 128,256

`gluon_fwd` rotates K and Q in shared memory in steps of ROT_ROWS tokens with the next step's table load in
flight; this times the kernel at other step heights (its constexprs, through `gluon_fwd.forward`'s launcher) by
CUDA-graph replay (`do_bench_cudagraph`, the kernel alone) and by `do_bench` (with the host's launch), after
checking each variant against `math` in float64. Needs a Hopper GPU.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

import attnhub
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import gluon_fwd, launch

SHAPES = ((256, 6), (256, 12), (128, 16))  # (B, H) of ViT-S, B, L at N = 197


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="128,256", help="comma list of step heights (multiples of 32)")
    rows = [int(r) for r in p.parse_args(argv).rows.split(",")]
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}", flush=True)
    table_rows = []
    for B, H in SHAPES:
        N, D = 197, 64
        qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        table = attnhub.CosSinTable(grid=(14, 14), head_dim=D, prefix_tokens=1, device="cuda")

        def variant(step, rope=True):
            def run(kernel, grid, args, num_warps, num_stages, **constexprs):
                constexprs.update(gluon_fwd.chunking(N, step))
                runtime.launch(kernel, grid, args, num_warps, num_stages, **constexprs)

            return lambda: gluon_fwd.forward(q, k, v, table if rope else None, D ** -0.5 * launch.LOG2E, run)

        ref = attnhub.attention(q[:8].double(), k[:8].double(), v[:8].double(), table, backend="math").float()
        cands = {f"gluon rot{step}": variant(step) for step in rows}
        for name, fn in cands.items():
            o = fn()[0]
            torch.cuda.synchronize()
            err = (o[:8].float() - ref).abs().max().item()
            print(f"  {B, H, N} {name}: max abs err vs float64 {err:.2e}", flush=True)
            if not err < 2e-2:
                raise SystemExit(f"{name} is wrong: max abs error {err}")
        cands["gluon no rope"] = variant(rows[0], rope=False)
        cands["sdpa cudnn (no rope)"] = lambda: F.scaled_dot_product_attention(q, k, v)
        cands["attnhub auto"] = lambda: attnhub.attention(q, k, v, table)
        cands["triton_rope_sdpa"] = lambda: attnhub.attention(q, k, v, table, backend="triton_rope_sdpa")
        with torch.no_grad():
            for name, fn in cands.items():
                fn()
                kernel_only = not name.startswith(("attnhub", "triton_rope"))  # the others: with their host launch
                graph = do_bench_cudagraph(fn, rep=100) if kernel_only else float("nan")
                table_rows.append(((B, H, N), name, graph, do_bench(fn, warmup=25, rep=100)))
    print(f"{'shape':16s} {'variant':22s} {'graph ms':>9s} {'do_bench ms':>11s}")
    for shape, name, graph, wall in table_rows:
        print(f"{str(shape):16s} {name:22s} {graph:9.4f} {wall:11.4f}")


if __name__ == "__main__":
    from attnhub import settings

    with settings.override(background_compile=False):  # each kernel timed from its first call (do_bench, graphs)
        main()
