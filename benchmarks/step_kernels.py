"""Where a compiled timm train step spends its GPU time, unpatched against patched: per-kernel device ms from
torch.profiler, side by side. Needs CUDA.

    python benchmarks/step_kernels.py [--model vit_base_patch16_rope_224 --img 384 --batch 64] [--top 25] [--out FILE]

Both models from one seed, compiled (Inductor), stepped as `bench_e2e.py` steps them (AdamW, bf16 autocast); each
step's kernels summed over `--iters` profiled steps (`benchkit.gpu_kernels_ms`), then grouped: the patch
embedding's convolution, attention (cuDNN / Flash / efficient SDPA kernels, attnhub's Triton and Gluon kernels),
GEMMs, the optimizer, Inductor's fused kernels (timm's RoPE among them), the rest. Prints the groups and each
model's top kernels.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from attnhub import benchkit
from bench_e2e import build, image_batch, step_fn  # noqa: I001 - benchmarks/, on sys.path when this script runs

GROUPS = (  # first match wins; names as the profiler reports kernels
    ("attention", re.compile(r"sdpa|fmha|flash|attn|dot_do_o|convert_dq|^(fwd|rotate|bwd_\w+|key_bounds)_kernel$"
                             r"|^bwd_preprocess$|^gluon_|^(resident|long)_fwd_kernel$", re.I)),
    ("conv", re.compile(r"convolution|nchwToNhwc|nhwcToNchw|fprop_optimized|ImplicitGemm", re.I)),  # patch embedding
    ("gemm", re.compile(r"gemm|sm90_xmma|cutlass|nvjet|matmul|splitK", re.I)),
    ("optimizer", re.compile(r"foreach|adam|multi_tensor", re.I)),
    ("inductor", re.compile(r"^triton_", re.I)),
)


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if pattern.search(name):
            return group
    return "other"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_rope_224")
    p.add_argument("--img", type=int, default=384)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out")
    p.set_defaults(depth=None, model_kwargs={})  # what bench_e2e.build reads besides --img
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    x, y = image_batch(args.batch, args.img, dev)
    report = dict(environment=benchkit.environment(dev), config=vars(args), models={})
    for name, variant in (("timm", "timm"), ("patched", "attnhub")):
        model = build(args.model, variant, args, dev)
        step = step_fn(torch.compile(model), "train", x, y, dev)
        for _ in range(3):
            step()
        kernels = benchkit.gpu_kernels_ms(step, device=dev, iters=args.iters)
        groups: dict[str, float] = {}
        for kernel, ms in kernels.items():
            groups[group_of(kernel)] = groups.get(group_of(kernel), 0.0) + ms
        report["models"][name] = dict(total_ms=sum(kernels.values()), groups=groups, kernels=kernels)
        del model, step
        torch.cuda.empty_cache()
    models = report["models"]
    print(f"{args.model} @ {args.img}, B = {args.batch}, compiled train step, GPU ms per step "
          f"({report['environment'].get('device_name')}, torch {torch.__version__})")
    names = sorted({g for m in models.values() for g in m["groups"]}, key=lambda g: -models["timm"]["groups"].get(g, 0))
    print(f"{'group':<12} {'timm':>9} {'patched':>9} {'diff':>9}")
    for g in [*names, "total"]:
        a = models["timm"]["total_ms"] if g == "total" else models["timm"]["groups"].get(g, 0.0)
        b = models["patched"]["total_ms"] if g == "total" else models["patched"]["groups"].get(g, 0.0)
        print(f"{g:<12} {a:9.3f} {b:9.3f} {b - a:+9.3f}")
    for name, m in models.items():
        print(f"\n{name}: top {args.top} kernels (ms per step, group)")
        for kernel, ms in sorted(m["kernels"].items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {ms:8.3f}  {group_of(kernel):<10} {kernel[:110]}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
