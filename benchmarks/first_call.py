"""Wall time of the first triton_fa_rope fwd+bwd call per ViT shape in one process (compilation included).

Run with an empty TRITON_CACHE_DIR for cold numbers:
    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/first_call.py [--no-compile-ahead]
Shapes after the first reuse its kernels unless a compile-time specialization differs (head_dim, dtype, layout).
--no-compile-ahead: compile each kernel at its launch, one after another, instead of all the training call's
kernels in parallel first (`_compile_ahead` in backends/triton_fa_rope.py).
"""

import argparse
import time

import torch

import attnhub
from attnhub.backends import triton_fa_rope as T

ap = argparse.ArgumentParser()
ap.add_argument("--no-compile-ahead", action="store_true")
if ap.parse_args().no_compile_ahead:
    T._COMPILE_AHEAD = False
print(f"compile ahead: {T._COMPILE_AHEAD}")

SHAPES = [  # name, B, H, grid, prefix tokens, layout
    ("vit_s16_224", 256, 6, 14, 1, "interleaved"),
    ("vit_l16_224", 128, 16, 14, 1, "interleaved"),
    ("vit_b16_384", 64, 12, 24, 1, "interleaved"),
    ("vit_b16_512_reg4", 32, 12, 32, 5, "interleaved"),
    ("dinov3_s16_224_reg4", 256, 6, 14, 5, "half"),
]

torch.ones(1, device="cuda")  # CUDA context outside the timings
for name, B, H, g, P, layout in SHAPES:
    table = attnhub.CosSinTable(grid=(g, g), head_dim=64, prefix_tokens=P, layout=layout, device="cuda")
    q, k, v = (torch.randn(B, H, P + g * g, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    start = time.perf_counter()
    o = attnhub.attention(q, k, v, table)
    torch.cuda.synchronize()
    fwd = time.perf_counter() - start
    o.backward(torch.ones_like(o))
    torch.cuda.synchronize()
    print(f"{name:<22} first fwd {fwd:6.2f} s, fwd+bwd {time.perf_counter() - start:6.2f} s")
