"""Where the host time of a cached triton_fa_rope call goes, piece by piece, on the GPU machine.

    python benchmarks/host_breakdown.py

Host µs per call (a loop without synchronisation, best of 3 loops): the ViT-S/16 inference call (B = 256, q, k, v
views of a fused projection) through `attnhub.attention`, the backend's entry, `launch.forward` and the launch
alone; then at the tiny shape (1, 1, 17, 64) fwd+bwd through `attnhub.attention`, `FlashRopeAttention.apply`, a
`Null` autograd.Function that launches nothing (the autograd engine's own floor), F.sdpa, and the launcher's parts
(`launch.forward`, `launch.backward`, the compile-ahead key, an allocation, a kept-runner launch and its key),
two rounds each (host cells vary between runs). Needs a CUDA GPU.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import attnhub
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import autograd as ag
from attnhub.backends.triton_fa_rope import configs
from attnhub.backends.triton_fa_rope import launch as L

SCALE = 0.125


def best(fn, n=500, rounds=3) -> float:
    """Host µs per call of fn: the best of `rounds` loops of n calls, synchronised only between loops."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    out = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out = min(out, (time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return out


class Null(torch.autograd.Function):
    """A Python autograd.Function that launches nothing but an allocation: the engine's and the Function's floor."""

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, g):
        return g, g, g


def kept_launch(r):
    return lambda: runtime.launch(r.kernel, r.grid, r.args, r.num_warps, r.num_stages, **r.constexprs)


def launch_key(r):
    """The key `runtime.launch` builds from a launch's arguments (as in `runtime.launch_keyed` with key=None)."""
    return lambda: (r.kernel, 0, r.num_warps, r.num_stages, tuple(r.constexprs.items()),
                    tuple([a if type(a) is int else (a.dtype, a.data_ptr() % 16 == 0)
                           if isinstance(a, torch.Tensor) else runtime._other_key(a) for a in r.args]))


def inference_rows(cfg) -> dict:
    qkv = torch.randn(256, 197, 3, 6, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    t = attnhub.CosSinTable(grid=(14, 14), head_dim=64, device="cuda", prefix_tokens=1)
    tab = ag._Table(*t.cos_sin(), 1, t.layout)
    with runtime.recording(run=True) as rec:
        L.forward(q, k, v, tab, SCALE, False, cfg)
    (r,) = rec
    return {
        "inf F.sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "inf attnhub": lambda: attnhub.attention(q, k, v, t),
        "inf entry": lambda: ag.attention(q, k, v, t, SCALE),
        "inf launch.forward": lambda: L.forward(q, k, v, tab, SCALE, False, cfg),
        f"inf runtime.launch {r.name}": kept_launch(r),
    }


def training_rows(cfg) -> dict:
    q, k, v = (torch.randn(1, 1, 17, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    t = attnhub.CosSinTable(grid=(4, 4), head_dim=64, device="cuda", prefix_tokens=1)
    tab = ag._Table(*t.cos_sin(), t.prefix_tokens, t.layout)
    o, lse, (qr, kr) = L.forward(q, k, v, tab, SCALE, True, cfg)

    def step(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(do)
        return run

    rows = {
        "F.sdpa fwd+bwd": step(lambda: F.scaled_dot_product_attention(q, k, v)),
        "attnhub fwd+bwd": step(lambda: attnhub.attention(q, k, v, t)),
        "Function.apply fwd+bwd": step(lambda: ag.FlashRopeAttention.apply(q, k, v, *t.cos_sin(), t, SCALE, None)),
        "Null Function fwd+bwd": step(lambda: Null.apply(q, k, v)),
        "F.sdpa fwd (grad)": lambda: F.scaled_dot_product_attention(q, k, v),
        "attnhub fwd (grad)": lambda: attnhub.attention(q, k, v, t),
        "launch.forward train": lambda: L.forward(q, k, v, tab, SCALE, True, cfg),
        "launch.backward fused": lambda: L.backward(do, qr, kr, v, o, lse, tab, SCALE, cfg, True),
        "compile_ahead key": lambda: L.compile_ahead(q, k, v, tab, SCALE, cfg),
        "torch.empty x1": lambda: torch.empty(1, 17, 64, device="cuda", dtype=torch.bfloat16),
        "q.new_empty(1) x1": lambda: q.new_empty(1, dtype=torch.uint8),
        "configs.for_call": lambda: configs.for_call(q.device, 64),
    }
    with runtime.recording(run=True) as rec:
        L.forward(q, k, v, tab, SCALE, True, cfg)
        L.backward(do, qr, kr, v, o, lse, tab, SCALE, cfg, True)
    for r in rec:
        rows[f"runtime.launch {r.name}"] = kept_launch(r)
        rows[f"  key only {r.name}"] = launch_key(r)
    return rows


def main() -> None:
    cfg = configs.for_call(torch.device("cuda", torch.cuda.current_device()), 64)
    with torch.no_grad():
        res = {name: best(fn, 300) for name, fn in inference_rows(cfg).items()}
    for name, fn in training_rows(cfg).items():  # two rounds: host cells vary run to run
        res[name] = (best(fn), best(fn))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; host us per call (best of 3x500; train: two "
          "rounds)")
    for name, val in res.items():
        print(f"{name:40s} " + (" ".join(f"{x:7.1f}" for x in val) if isinstance(val, tuple) else f"{val:7.1f}"))


if __name__ == "__main__":
    main()
