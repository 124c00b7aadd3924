"""Kernel-development experiment: forward paths, forward configs and host launch cost of triton_fa_rope.

On the lent GPU, side by side in one process, for the ViT shapes:
- correctness of every forward path (RoPE in the attention kernel, or K / q and K rotated first by
  `_rotate_kernel`, with the narrow last K tile) and of the backward behind the training forward, against float64 math;
- `_forward` time per path, config and pass (inference / training), with and without the narrow last K tile;
- F.sdpa cuDNN without RoPE, forward and forward+backward (the reference);
- host time per call of `_forward`, `_backward` and an autograd forward+backward, launching through
  `kernel[grid](...)` every time and through the launcher's kept compiled kernels (`T._RUNNERS`, shipped since
  this script measured it as a candidate);
- forward+backward of `attnhub.attention` per training path, against cuDNN.
Usage: python benchmarks/fwd_paths.py --out $OUT/fwd_paths.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnhub
from attnhub.backends import triton_fa_rope as T
from attnhub.bench import SHAPES as BENCH_SHAPES, _host_us
from profile_host import host_rows  # benchmarks/ is on sys.path when this script runs

SHAPES = {name: (B, H, g, P, D) for name, (B, H, N, D, P, g) in BENCH_SHAPES.items()  # (B, H, grid, prefix, D)
          if name != "vit_l16_224"}
# the shipped inference and training configs, 8 warps (no spills offline), and BLOCK_M = 256 (one query block
# per (b, h) at N <= 256: each K tile rotated once instead of twice)
CONFIGS = [(128, 64, 4, 3), (128, 32, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3)]
_SHIPPED_LAUNCH = T._CACHED_RUNNERS
LAUNCHES = (("kernel[grid]", False), ("cached", True))


def use_launch(cached: bool) -> None:
    """Launch through `kernel[grid](...)` every time, or through the kept compiled kernels (emptied first)."""
    T._CACHED_RUNNERS = cached
    T._RUNNERS.clear()


def bench(fn, grads=None):
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def set_cfg(base, **over):
    T._device_configs.cache_clear()
    T._CONFIGS[(9, 64)] = {**base, **over}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    env = f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}"
    print(env)
    records = [dict(what="env", value=env)]
    base = dict(T._configs(torch.empty(1, device="cuda"), 64))

    def save():  # after each section, so a run cut short keeps what it measured
        with open(args.out, "w") as fh:
            json.dump(records, fh, indent=1)

    # correctness of every path, both layouts, against float64 math (2 images), forward and gradients
    for name, (B, H, g, P, D) in SHAPES.items():
        N = P + g * g
        for lay in ("interleaved", "half"):
            tab = attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P, layout=lay, device="cuda")
            x = [torch.randn(2, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            ref = [t.double().requires_grad_() for t in x[:3]]
            o_ref = attnhub.attention(*ref, tab, backend="math")
            o_ref.backward(x[3].double())
            for pre in ((False, False), (True, True)):
                set_cfg(base, prerotate_from_n=(0, 0) if pre[0] else (None, None), narrow_tail=pre[0])
                use_launch(False)
                xs = [t.clone().requires_grad_() for t in x[:3]]
                o = attnhub.attention(*xs, tab, backend="triton_fa_rope")
                o.backward(x[3])
                with torch.no_grad():
                    o_inf = attnhub.attention(*x[:3], tab, backend="triton_fa_rope")
                errs = dict(o_train=rel(o, o_ref), o_infer=rel(o_inf, o_ref),
                            **{f"d{c}": rel(a.grad, r.grad) for c, a, r in zip("qkv", xs, ref)})
                use_launch(True)  # the kept compiled kernels must give the same bits
                for _ in range(2):  # the first call fills its cache, the second launches from it
                    xc = [t.clone().requires_grad_() for t in x[:3]]
                    oc = attnhub.attention(*xc, tab, backend="triton_fa_rope")
                    oc.backward(x[3])
                use_launch(_SHIPPED_LAUNCH)
                errs["cached_launch_bitwise"] = float(all(torch.equal(a, b) for a, b in
                                                          zip([o, *(t.grad for t in xs)], [oc, *(t.grad for t in xc)])))
                records.append(dict(what="check", shape=name, layout=lay, prerotate=pre, **errs))
                print(f"check {name} {lay} prerotate={pre}: " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    set_cfg(base)
    save()

    for name, (B, H, g, P, D) in SHAPES.items():
        N = P + g * g
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        tab = attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P, device="cuda")
        scale = D ** -0.5
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            do = torch.randn_like(q)
            ms_fb = bench(lambda: F.scaled_dot_product_attention(qg, kg, vg).backward(do), [qg, kg, vg])
        records += [dict(what="cudnn_fwd", shape=name, ms=ms), dict(what="cudnn_fwdbwd", shape=name, ms=ms_fb)]
        print(f"{name} cudnn no rope: fwd {ms:.4f} fwd+bwd {ms_fb:.4f} ms")
        for cfg in CONFIGS:
            for tail in (True, False):
                for train in (False, True):
                    for pre in (False, True):
                        set_cfg(base, fwd=cfg, fwd_train=cfg, fwd_train_prerotated=cfg,
                                prerotate_from_n=(0, 0) if pre else (None, None), narrow_tail=tail)
                        try:
                            ms = bench(lambda: T._forward(q, k, v, tab, scale, train))
                        except Exception as exc:  # e.g. out of shared memory for a config
                            print(f"{name} {cfg} train={train} pre={pre}: {type(exc).__name__}: {str(exc)[:120]}")
                            continue
                        records.append(dict(what="fwd", shape=name, cfg=cfg, tail=tail, train=train, prerotate=pre,
                                            ms=ms))
                        print(f"{name} cfg {cfg} tail {tail!s:<5} train {train!s:<5} prerot {pre!s:<5} {ms:.4f} ms")
        set_cfg(base)
        save()

    # host cost per call, tiny shape (the GPU work is negligible), fast vs slow launch
    rows = host_rows()
    for launch_name, cached in LAUNCHES:
        use_launch(cached)
        for row, us in zip(rows, _host_us(list(rows.values()), 1000, torch.device("cuda"))):
            records.append(dict(what="host_us", launch=launch_name, row=row, us=us))
            print(f"host {launch_name:<13} {row:<34} {us:8.1f} us/call")
    use_launch(_SHIPPED_LAUNCH)
    save()

    # forward+backward through attnhub.attention per training path and launch, ViT-S and ViT-B@384
    for name in ("vit_s16_224", "vit_b16_384"):
        B, H, g, P, D = SHAPES[name]
        N = P + g * g
        tab = attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P, device="cuda")
        qg, kg, vg = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                      for _ in range(3))
        do = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        for launch_name, cached in LAUNCHES:
            use_launch(cached)
            for pre in (False, True):
                set_cfg(base, prerotate_from_n=(None, 0 if pre else None))
                attnhub.attention(qg, kg, vg, tab).backward(do)
                ms = bench(lambda: attnhub.attention(qg, kg, vg, tab).backward(do), [qg, kg, vg])
                records.append(dict(what="fwdbwd", shape=name, launch=launch_name, prerotate_train=pre, ms=ms))
                print(f"{name} fwd+bwd launch {launch_name:<13} prerotate_train {pre!s:<5} {ms:.4f} ms")
        use_launch(_SHIPPED_LAUNCH)
        set_cfg(base)

    save()
    print("\n== best forward per shape / pass / path / last K tile")
    best = {}
    for r in records:
        if r["what"] == "fwd":
            key = (r["shape"], "train" if r["train"] else "infer", "prerot" if r["prerotate"] else "fused",
                   "tail" if r["tail"] else "full")
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    cud = {r["shape"]: r["ms"] for r in records if r["what"] == "cudnn_fwd"}
    for key, r in sorted(best.items()):
        print(f"  {' '.join(key):<40} {r['ms']:.4f} ms cfg {r['cfg']}  cudnn/this {cud[key[0]] / r['ms']:.2f}")


if __name__ == "__main__":
    main()
