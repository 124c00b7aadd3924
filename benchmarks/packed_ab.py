"""A/B of the compiled patched timm train step with `attention_packed` as the packed operators (the backward returns
the projection's gradient whole; the default) against the same step on the views (Inductor copies their three
gradients into one, as before the packed operators), with timm's own compiled step beside. Needs CUDA.

    python benchmarks/packed_ab.py [--model vit_base_patch16_rope_224 --img 384 --batch 64] [--out FILE]

Three models from one seed, each compiled once; each measured twice, interleaved: the step's median ms (do_bench, as
bench_e2e times it) and its GPU time summed by torch.profiler (`benchkit.gpu_ms`: host gaps excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from unittest import mock

import torch

from attnhub import api, benchkit
from bench_e2e import build, image_batch, step_fn  # noqa: I001 - benchmarks/, on sys.path when this script runs


def _views():
    """attention_packed on the views: no entry is handed qkv (read when a graph is traced; kept for its runs)."""
    return mock.patch.object(api, "_packed_for", lambda fn, qkv: None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_rope_224")
    p.add_argument("--img", type=int, default=384)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out")
    p.set_defaults(depth=None, model_kwargs={})  # what bench_e2e.build reads besides --img
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    x, y = image_batch(args.batch, args.img, dev)
    steps = {name: step_fn(torch.compile(build(args.model, "timm" if name == "timm" else "attnhub", args, dev)),
                           "train", x, y, dev)
             for name in ("timm", "packed", "views")}
    report = dict(environment=benchkit.environment(dev), config=vars(args), rows=[])
    for name in list(steps) * 2:
        with _views() if name == "views" else contextlib.nullcontext():
            step = steps[name]
            step()
            ms = benchkit.time_ms(step, device=dev, warmup=200, rep=1000)
            gpu = benchkit.gpu_ms(step, device=dev, iters=5)
        report["rows"].append(dict(variant=name, ms=ms, gpu_ms=gpu))
        print(f"{name:<8} step {ms:8.3f} ms, GPU {gpu:8.3f} ms", flush=True)
    best = {name: min(r["ms"] for r in report["rows"] if r["variant"] == name) for name in steps}
    report["timm_over"] = {name: best["timm"] / best[name] for name in ("packed", "views")}
    ratios = ", ".join(f"{k} {v:.3f}x" for k, v in report["timm_over"].items())
    print(f"timm compiled / patched (best of two): {ratios}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
