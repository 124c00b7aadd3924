"""Host (CPU) cost of one attnhub call on the GPU machine: where the microseconds go. Dev tool, prints a report."""

import cProfile
import pstats
import time

import torch

import attnhub
from attnhub.backends import triton_fa_rope as T


def per_call_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def host_rows() -> dict:
    """name -> a call at a tiny shape (q, k, v: [1, 1, 17, 64] bf16, a 4x4 grid after one CLS token), where the GPU
    work is negligible and a loop of calls measures host time. Also used by fwd_paths.py."""
    q = torch.randn(1, 1, 17, 64, device="cuda", dtype=torch.bfloat16)
    t = attnhub.CosSinTable(grid=(4, 4), head_dim=64, device="cuda")
    qg, kg, vg = (q.clone().requires_grad_() for _ in range(3))
    do = torch.randn_like(q)
    o, lse, (qs, ks) = T._forward(q, q, q, t, 0.125, True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {
        "attnhub.attention (auto)": lambda: attnhub.attention(q, q, q, t),
        "attnhub.attention (backend=)": lambda: attnhub.attention(q, q, q, t, backend="triton_fa_rope"),
        "triton entry direct": lambda: T.attention(q, q, q, t, 0.125),
        "T._forward": lambda: T._forward(q, q, q, t, 0.125, False),
        "T._backward": lambda: T._backward(do, qs, ks, q, o, lse, t, 0.125),
        "T.attention fwd+bwd (autograd)": lambda: T.attention(qg, kg, vg, t, 0.125).backward(do),
        "attnhub.attention fwd+bwd": lambda: attnhub.attention(qg, kg, vg, t).backward(do),
        "F.sdpa fwd": lambda: sdpa(q, q, q),
        "F.sdpa fwd+bwd (autograd)": lambda: sdpa(qg, kg, vg).backward(do),
        "torch.empty": lambda: torch.empty(1, 17, 1, 64, device="cuda"),
    }


def main() -> None:
    rows = host_rows()
    for name, fn in rows.items():
        print(f"{name:<32} {per_call_us(fn):8.1f} us/call")
    for name in ("T._forward", "T._backward", "T.attention fwd+bwd (autograd)"):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(500):
            rows[name]()
        pr.disable()
        print(f"\n=== cProfile {name} (500 calls)")
        pstats.Stats(pr).sort_stats("tottime").print_stats(14)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(14)


if __name__ == "__main__":
    main()
