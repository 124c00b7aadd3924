"""A/B of triton_fa_rope config tables in one compiled (or eager) timm train step: the same model and compiled graph,
each variant's configs applied by `configs.override` around the step (the kernels read them at run time). Needs
CUDA.

    python benchmarks/e2e_ab.py --variants '{"triton": {"resident_train_max_n": 0}, "table": {}}' [--eager]

Per variant: the step's median ms (do_bench, as bench_e2e times it) and its GPU time summed by torch.profiler
(`benchkit.gpu_ms`: host gaps excluded), then the ten CUDA kernels that took longest over five profiled steps.
"""

from __future__ import annotations

import argparse
import json

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from attnhub import benchkit
from attnhub.backends.triton_fa_rope import configs
from attnhub.integrations import timm as attnhub_timm
from bench_e2e import step_fn  # noqa: I001 - benchmarks/, on sys.path when this script runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_rope_224")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--variants", type=json.loads, default={"triton": {"resident_train_max_n": 0}, "table": {}})
    p.add_argument("--eager", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = attnhub_timm.patch(timm.create_model(args.model, pretrained=False, img_size=args.img).to(dev))
    x = torch.randn(args.batch, 3, args.img, args.img, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    step = step_fn(model if args.eager else torch.compile(model), "train", x, y, dev)  # bench_e2e's train step

    report = dict(environment=benchkit.environment(dev), config=vars(args), rows=[])
    for name, fields in list(args.variants.items()) * 2:  # each twice, interleaved
        with configs.override(**fields):
            step()
            ms = benchkit.time_ms(step, device=dev, warmup=200, rep=1000)
            gpu = benchkit.gpu_ms(step, device=dev, iters=5)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
        top = sorted(((e.key, e.self_device_time_total / 5e3, e.count // 5) for e in prof.key_averages()),
                     key=lambda t: -t[1])[:10]
        report["rows"].append(dict(variant=name, fields=fields, ms=ms, gpu_ms=gpu, top=top))
        print(f"{name:<10} step {ms:8.3f} ms, GPU {gpu:8.3f} ms", flush=True)
        for key, t, n in top:
            print(f"    {t:8.3f} ms  x{n:<4} {key[:110]}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
