"""Kernel-development experiment: what the RoPE fusion costs in the triton_fa_rope forward, on the lent GPU.

Times `_forward` (inference and training) of the ViT shapes for: the table as shipped (fp32), the table in fp16
(half the bytes the kernels read per tile), the half layout, and no RoPE at all (the bound RoPE fusion can reach),
plus F.sdpa cuDNN without RoPE, and a few forward configs with each table. Correctness first (float64 math).
Usage: python benchmarks/fwd_variants.py --out $OUT/fwd_variants.json
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

SHAPES = {  # name: (B, H, grid, prefix, D)
    "vit_s16_224": (256, 6, 14, 1, 64),
    "vit_b16_224": (256, 12, 14, 1, 64),
    "vit_b16_384": (64, 12, 24, 1, 64),
    "vit_b16_512_reg4": (32, 12, 32, 5, 64),
}
CONFIGS = [(128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2)]
_ORIGINAL_TABLE_ARGS = T._table_args


def _table_args_as(dtype):
    def table_args(rope, q):
        cos, sin, sh, sn, p = _ORIGINAL_TABLE_ARGS(rope, q)
        if rope is None:
            return cos, sin, sh, sn, p
        return cos.to(dtype).contiguous(), sin.to(dtype).contiguous(), sh, sn, p
    return table_args


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    records = []
    for name, (B, H, g, P, D) in SHAPES.items():
        N = P + g * g
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        tables = {lay: attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P, layout=lay, device="cuda")
                  for lay in ("interleaved", "half")}
        scale = D ** -0.5
        # correctness of each table precision on a 2-image slice, against float64 math
        for tdt in (torch.float32, torch.float16):
            T._table_args = _table_args_as(tdt)
            for lay, tab in tables.items():
                o = T._forward(q[:2], k[:2], v[:2], tab, scale, False)[0]
                ref = attnhub.attention(q[:2].double(), k[:2].double(), v[:2].double(), tab, backend="math")
                err = float((o.double() - ref).norm() / ref.norm())
                records.append(dict(shape=name, what="rel_l2", table=str(tdt), layout=lay, value=err))
                print(f"{name} table {tdt} {lay}: rel_l2 {err:.2e}")
        T._table_args = _ORIGINAL_TABLE_ARGS
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        records.append(dict(shape=name, what="sdpa_cudnn_norope", ms=ms))
        print(f"{name} cudnn no rope: {ms:.4f} ms")
        base_cfg = dict(T._configs(q, 64))
        for cfg in CONFIGS:
            T._device_configs.cache_clear()
            T._CONFIGS[(9, 64)] = {**base_cfg, "fwd": cfg}
            for tdt in (torch.float32, torch.float16):
                T._table_args = _table_args_as(tdt)
                for lay, tab in [("none", None), *tables.items()]:
                    if lay == "none" and tdt == torch.float16:
                        continue
                    for train in (False, True):
                        try:
                            ms = bench(lambda: T._forward(q, k, v, tab, scale, train))
                        except Exception as exc:  # e.g. out of shared memory for a config
                            print(f"{name} {cfg} {lay} {tdt}: {type(exc).__name__}: {str(exc)[:100]}")
                            continue
                        records.append(dict(shape=name, what="fwd", cfg=cfg, table=str(tdt), layout=lay,
                                            train=train, ms=ms))
                        print(f"{name} cfg {cfg} layout {lay:<11} table {str(tdt):<13} train {train!s:<5} {ms:.4f} ms")
            T._table_args = _ORIGINAL_TABLE_ARGS
        T._CONFIGS[(9, 64)] = base_cfg
        T._device_configs.cache_clear()
    with open(args.out, "w") as fh:
        json.dump(records, fh, indent=1)
    print("\nbest per shape/layout/table/train:")
    best = {}
    for r in records:
        if r["what"] == "fwd":
            key = (r["shape"], r["layout"], r["table"], r["train"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    for key, r in sorted(best.items()):
        print(f"  {key}: {r['ms']:.4f} ms cfg {r['cfg']}")


if __name__ == "__main__":
    main()
