"""Static look at the triton_fa_rope kernels as compiled for Hopper (sm_90), without a GPU.

Compiles each forward variant offline with `triton.compile(..., target=GPUTarget("cuda", 90, 32))` for the ViT-S/16
bf16 call (q, k, v views of one fused qkv projection) and reports, per variant: compile time on this machine,
registers and spills (ptxas -v on Triton's PTX), shared memory, and instruction counts that tell how K and V
reach the tensor cores (wgmma, cp.async / TMA loads, plain global loads, shared-memory stores). A GPU measures
speed; this says what the compiler made of each variant. Usage: python benchmarks/sm90_static.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnhub.backends import triton_fa_rope as T

B, H, N, D, P = 256, 6, 197, 64, 1  # ViT-S/16 @ 224
QKV_STRIDES = (N * 3 * H * D, D, 3 * H * D, 1)  # [B, N, 3, H, D] viewed as [B, H, N, D]
O_STRIDES = (N * H * D, D, H * D, 1)  # the [B, N, H, D] output layout
ROT_STRIDES = (H * N * D, N * D, D, 1)  # saved rotations [B, H, N, D]


def _signature(kernel, args: list, constexprs: dict):
    """Triton's JIT specialization, done by hand: pointers and ints divisible by 16 get the divisibility
    attribute, ints equal to 1 become constants (except do_not_specialize parameters)."""
    sig, consts, attrs = {}, dict(constexprs), {}
    dns = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    for i, (p, a) in enumerate(zip(kernel.params, args)):
        name = p.name
        if isinstance(a, str):  # a pointer: "*bf16"
            sig[name] = a
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        elif a == 1 and name not in dns:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if a % 16 == 0 and name not in dns:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        sig[name] = "constexpr"
    return sig, consts, attrs


def _ptxas(ptx: str) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        out = subprocess.run([ptxas, "-v", "-arch=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return dict(regs=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(1)) if spill else None, spill_loads=int(spill.group(2)) if spill else None)


def compile_variant(kernel, args, constexprs, warps, stages) -> dict:
    sig, consts, attrs = _signature(kernel, args, constexprs)
    src = ASTSource(kernel, sig, consts, attrs)
    t0 = time.perf_counter()
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    seconds = time.perf_counter() - t0
    ptx = k.asm["ptx"]
    counts = {name: len(re.findall(pat, ptx)) for name, pat in [
        ("wgmma", r"wgmma\.mma_async"), ("mma_sync", r"\bmma\.sync"), ("cp_async", r"cp\.async\.(?:ca|cg)"),
        ("tma_load", r"cp\.async\.bulk\.tensor"), ("ld_global", r"\bld\.global"), ("st_shared", r"\bst\.shared"),
        ("ldmatrix", r"ldmatrix"), ("ex2", r"ex2\.approx")]}
    return dict(compile_s=round(seconds, 2), shared_bytes=k.metadata.shared, **_ptxas(ptx), **counts)


def fwd_args(rope_k: bool, save_rot: bool, training_prerot: bool) -> list:
    ptr, f32 = "*bf16", "*fp32"
    q_strides = ROT_STRIDES if training_prerot else QKV_STRIDES
    k_strides = ROT_STRIDES if not rope_k else QKV_STRIDES
    return [ptr, ptr, ptr, ptr, f32, f32, f32, ptr, ptr, *q_strides, *k_strides, *QKV_STRIDES, *O_STRIDES,
            0, D // 2, H, N, N, P, 0.125 * 1.4426950408889634]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    meta_rope = {k: v for k, v in T._meta_for(D, torch.bfloat16, "interleaved").items()}
    meta_none = T._meta_for(D, torch.bfloat16, None)
    rows = []
    variants = [  # name, meta, ROPE_K, SAVE_ROT, training with pre-rotated q and k, configs
        ("infer: rope in kernel", meta_rope, True, False, False),
        ("infer: K pre-rotated", meta_rope, False, False, False),
        ("infer: no rope (bound)", meta_none, False, False, False),
        ("train: rope in kernel, saves q,k", meta_rope, True, True, False),
        ("train: q,K pre-rotated", meta_none, False, False, True),
    ]
    for cfg in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 2)]:
        bm, bn, warps, stages = cfg
        for tail in (bn, 16):
            for name, meta, rope_k, save_rot, prerot in variants:
                constexprs = dict(meta, BLOCK_M=bm, BLOCK_N=bn, SAVE_ROT=save_rot, ROPE_K=rope_k and meta["ROPE"],
                                  TAIL_N=tail)
                r = compile_variant(T._fwd_kernel, fwd_args(rope_k and meta["ROPE"], save_rot, prerot), constexprs,
                                    warps, stages)
                rows.append(dict(variant=name, cfg=cfg, tail=tail, **r))
                print(f"{name:<36} cfg {cfg} tail {tail:>3}: " + " ".join(f"{k} {v}" for k, v in r.items()))
    meta_rot = {k: meta_rope[k] for k in T._ROT_META}
    r = compile_variant(T._rotate_kernel, ["*bf16", "*bf16", "*fp32", "*fp32", *QKV_STRIDES, 0, D // 2, H, N, P],
                        dict(meta_rot, BLOCK_M=T._ROT_M), 4, 1)
    rows.append(dict(variant="rotate pass", cfg=(T._ROT_M, 0, 4, 1), tail=0, **r))
    print(f"{'rotate pass':<36}: " + " ".join(f"{k} {v}" for k, v in r.items()))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, target="cuda sm_90 (offline)",
                           shape=dict(B=B, H=H, N=N, D=D, P=P), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
