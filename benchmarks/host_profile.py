"""Host time of one attention call on the GPU machine: where a cached call's microseconds go.

    python benchmarks/host_profile.py

Inference at ViT-S/16 (B = 256: the device is busy; B = 4: it idles, so the loop measures the host), per call:
host µs (the loop's enqueue time) and wall µs, for triton_fa_rope (the Gluon forward, kept runners and Triton's own
`kernel[grid]` launch), triton_rope_sdpa, the automatic choice and F.sdpa without RoPE, two rounds each; then a
cProfile of 500 triton_fa_rope calls. Training at the tiny shape (1, 1, 17, 64): host µs per fwd+bwd against
F.sdpa's, and a cProfile of 500 triton_fa_rope steps. Host-bound numbers vary between runs: compare rounds.
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import attnhub
from attnhub.backends import _triton_runtime as runtime


def make(B, H=6, N=197, D=64):
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16)
    return (*qkv.permute(2, 0, 3, 1, 4).unbind(0), attnhub.CosSinTable(grid=(14, 14), head_dim=D, device="cuda"))


def timed(fn, n=300):
    """-> (host µs, wall µs) per call of n calls after 30 untimed ones."""
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / n * 1e6


def profile(fn, calls=500, top=25):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main() -> None:
    rows = []
    for B in (256, 4):
        q, k, v, t = make(B)
        cands = {
            "fa_rope gluon kept": lambda: attnhub.attention(q, k, v, t, backend="triton_fa_rope"),
            "rope_sdpa": lambda: attnhub.attention(q, k, v, t, backend="triton_rope_sdpa"),
            "F.sdpa no rope": lambda: F.scaled_dot_product_attention(q, k, v),
            "auto": lambda: attnhub.attention(q, k, v, t),
        }
        with torch.no_grad():
            for r in range(2):
                rows += [(B, r, name, *timed(fn)) for name, fn in cands.items()]
                with runtime.fresh_caches(keep_runners=False):
                    rows.append((B, r, "fa_rope gluon kernel[grid]", *timed(cands["fa_rope gluon kept"])))
            if B == 4:
                profile(cands["fa_rope gluon kept"], top=18)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'B':>4} {'round':>5} {'path':28s} {'host us':>8} {'wall us':>8}")
    for B, r, name, host, wall in rows:
        print(f"{B:4d} {r:5d} {name:28s} {host:8.1f} {wall:8.1f}")

    q, k, v, _ = make(1, H=1, N=17)
    t = attnhub.CosSinTable(grid=(4, 4), head_dim=64, device="cuda")
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    train = {"fa_rope fwd+bwd": lambda: attnhub.attention(q, k, v, t, backend="triton_fa_rope").backward(do),
             "rope_sdpa fwd+bwd": lambda: attnhub.attention(q, k, v, t, backend="triton_rope_sdpa").backward(do),
             "F.sdpa fwd+bwd": lambda: F.scaled_dot_product_attention(q, k, v).backward(do)}
    for r in range(2):
        for name, fn in train.items():
            print(f"tiny r{r} {name:22s} host {timed(fn, 500)[0]:7.1f} us")
    profile(train["fa_rope fwd+bwd"])


if __name__ == "__main__":
    main()
