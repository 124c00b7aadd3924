"""Kernel-development sweep for triton_fa_rope on the lent GPU: correctness, then times of variants and configs.

Prints one table; full records go to --out (JSON). Not the user-facing benchmark (that is attnhub.bench).
Usage: python benchmarks/tune_triton.py --shapes vit_s16_224 --sweep fwd,dkdv,dq --out $OUT/tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnhub
from attnhub.backends import triton_fa_rope as T

SHAPES = {  # name: (B, H, grid, prefix, D)
    "vit_s16_224": (256, 6, 14, 1, 64),
    "vit_b16_224": (256, 12, 14, 1, 64),
    "vit_l16_224": (128, 16, 14, 1, 64),
    "vit_b16_384": (64, 12, 24, 1, 64),
    "vit_b16_512_reg4": (32, 12, 32, 5, 64),
}


CANDIDATES = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages); the first sweep (results/dev_h100_tune1.json) pruned
    "fwd": [(64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 4, 2), (128, 32, 4, 2),
            (256, 32, 8, 2), (256, 64, 8, 2), (256, 32, 8, 3), (256, 64, 8, 3), (256, 32, 16, 2)],
    "dkdv": [(32, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2),
             (64, 128, 8, 3), (128, 64, 8, 2)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 2), (128, 32, 8, 2), (64, 128, 4, 2),
           (128, 128, 8, 2)],
}


def bench(fn, grads=None):
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def make(shape, layout="interleaved", dtype=torch.bfloat16):
    B, H, g, P, D = shape
    N = P + g * g
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    table = None if layout is None else attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P,
                                                            layout=layout, device="cuda")
    return q, k, v, table


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def check(shape, layout):
    q, k, v, t = make(shape, layout)
    do = torch.randn_like(q)
    o = attnhub.attention(q, k, v, t, backend="triton_fa_rope")
    o.backward(do)
    got = [o.detach(), q.grad, k.grad, v.grad]
    q2, k2, v2 = (x.detach().float().requires_grad_() for x in (q, k, v))
    r = attnhub.attention(q2, k2, v2, t, backend="math")
    r.backward(do.float())
    return [rel(a, b) for a, b in zip(got, [r.detach(), q2.grad, k2.grad, v2.grad])]


def time_triton(shape, layout):
    """Kernel-level times (no autograd): forward for inference, forward that saves rotated q/k, backward."""
    q, k, v, t = make(shape, layout)
    do = torch.randn_like(q)
    sc = q.shape[-1] ** -0.5
    q, k, v = q.detach(), k.detach(), v.detach()
    fwd = bench(lambda: T._forward(q, k, v, t, sc, False))
    fwd_train = bench(lambda: T._forward(q, k, v, t, sc, True))
    o, lse, (qs, ks) = T._forward(q, k, v, t, sc, True)
    bwd = bench(lambda: T._backward(do, qs, ks, v, o, lse, t, sc))
    return fwd, fwd_train + bwd, fwd_train, bwd


def time_sdpa(shape, backend):
    q, k, v, _ = make(shape, None)
    do = torch.randn_like(q)
    with sdpa_kernel([backend]):
        fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        fb = bench(lambda: F.scaled_dot_product_attention(q, k, v).backward(do), grads=[q, k, v])
    return fwd, fb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", default="", help="comma list of kernels to sweep configs for: fwd,dkdv,dq")
    ap.add_argument("--sweep-shapes", default="vit_s16_224")
    ap.add_argument("--out", default="tune.json")
    args = ap.parse_args()
    rows, recs = [], []
    dev = torch.cuda.get_device_name()
    print(f"{dev} torch {torch.__version__} triton {triton.__version__}", flush=True)

    for name in args.shapes.split(","):
        shape = SHAPES[name]
        t0 = time.perf_counter()
        errs = check(shape, "interleaved")
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        rec = {"shape": name, "first_call_s": first, "err_o_dq_dk_dv": errs}
        for label, layout in [("rope_il", "interleaved"), ("rope_half", "half"), ("norope", None)]:
            rec[label] = time_triton(shape, layout)
        rec["cudnn"] = time_sdpa(shape, SDPBackend.CUDNN_ATTENTION)
        rec["flash"] = time_sdpa(shape, SDPBackend.FLASH_ATTENTION)
        recs.append(rec)
        print(json.dumps(rec), flush=True)

    base = {k: dict(v) for k, v in T._CONFIGS.items()}
    for kernel, sname in itertools.product([s for s in args.sweep.split(",") if s], args.sweep_shapes.split(",")):
        shape = SHAPES[sname]
        cands = CANDIDATES[kernel]
        for cfg in cands:
            T._CONFIGS.clear()
            T._CONFIGS.update({k: dict(v) for k, v in base.items()})
            T._CONFIGS[(9, 64)][kernel] = cfg
            T._device_configs.cache_clear()  # the launcher caches the config it looked up per device
            try:
                fwd, fb, ft, bw = time_triton(shape, "interleaved")
                err = max(check(shape, "interleaved"))
            except Exception as exc:  # noqa: BLE001 - an infeasible config (shared memory) is a result too
                fwd = fb = err = ft = bw = float("nan")
                print(f"{kernel} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            rows.append((kernel, sname, cfg, fwd, fb, err, ft, bw))
            print(f"sweep {kernel} {sname} {cfg} fwd {fwd:.4f} fwd_train {ft:.4f} bwd {bw:.4f} fwdbwd {fb:.4f} "
                  f"err {err:.1e}", flush=True)
    T._CONFIGS.clear()
    T._CONFIGS.update(base)
    T._device_configs.cache_clear()

    json.dump({"device": dev, "torch": torch.__version__, "triton": triton.__version__, "shapes": recs,
               "sweep": rows}, open(args.out, "w"), indent=1)
    print("\nshape             first_s  il_fwd  il_fb  half_fwd half_fb norope_fwd norope_fb "
          "cudnn_fwd cudnn_fb flash_fwd flash_fb  max_err")
    for r in recs:
        print(f"{r['shape']:<17} {r['first_call_s']:6.2f} " + " ".join(
            f"{r[k][0]:7.3f} {r[k][1]:7.3f}" for k in ("rope_il", "rope_half", "norope", "cudnn", "flash"))
            + f"  {max(r['err_o_dq_dk_dv']):.1e}")
    for kernel in sorted({r[0] for r in rows}):
        for sname in sorted({r[1] for r in rows}):
            best = sorted((r for r in rows if r[0] == kernel and r[1] == sname and r[4] == r[4]),
                          key=lambda r: r[7] if kernel != "fwd" else r[3])
            print(f"best {kernel} {sname}: " + "; ".join(f"{r[2]} fwd {r[3]:.4f} bwd {r[7]:.4f}" for r in best[:4]))


if __name__ == "__main__":
    main()
