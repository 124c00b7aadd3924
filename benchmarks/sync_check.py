"""Where a training step makes the host wait for the GPU: every synchronizing CUDA call (a `.item()`, a
host copy, a `nonzero`) of a few eager train steps, timm's model and the attnhub-patched one, counted per source
line (`torch.cuda.set_sync_debug_mode("warn")`). A step that syncs leaves the GPU idle while the host launches
what follows.

    python benchmarks/sync_check.py --model naflexvit_base_patch16_gap --model-kwargs '{"rope_type": "axial"}'

NaFlex models get a padded NaFlex batch (bench_e2e's `naflex_batch`), others images. On a CPU nothing syncs and the
counts are zero.
"""

from __future__ import annotations

import argparse
import collections
import json
import traceback
import warnings

import timm
import torch
import torch.nn.functional as F

from attnhub.integrations import timm as attnhub_timm
from bench_e2e import _naflex, naflex_batch


def _where(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame outside torch and warnings: the line that asked for the sync."""
    for frame in reversed(stack):
        where = frame.filename.split("site-packages/")[-1]  # a venv may itself live under a folder named torch
        if not where.startswith("torch/") and not where.endswith(("warnings.py", "sync_check.py")):
            return f"{where}:{frame.lineno} {frame.name}"
    return "?"


def syncs(model, x, y, steps: int) -> collections.Counter:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seen: collections.Counter = collections.Counter()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(y.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    step()  # first step: allocations, compilation of Triton kernels
    if y.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")

    def record(message, category, filename, lineno, file=None, line=None):
        seen[_where(traceback.extract_stack()[:-1])] += 1

    try:
        with warnings.catch_warnings():  # restores showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            for _ in range(steps):
                step()
    finally:
        if y.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return seen


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="naflexvit_base_patch16_gap")
    p.add_argument("--model-kwargs", type=json.loads, default={"rope_type": "axial"})
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=576)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    extra = {"depth": args.depth} if args.depth else {}
    if _naflex(args.model):
        x = {k: t.to(device) for k, t in naflex_batch(args.batch, args.seq_len, generator=torch.Generator()
                                                       .manual_seed(0)).items()}
    else:
        extra["img_size"] = args.img
        x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    print(f"torch {torch.__version__} timm {timm.__version__} {device}; {args.model} {args.model_kwargs}, "
          f"{args.steps} eager train steps after one", flush=True)
    for variant in ("timm", "attnhub"):
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False, **extra, **args.model_kwargs).to(device)
        if variant == "attnhub":
            model = attnhub_timm.patch(model)
        model.train()
        seen = syncs(model, x, y, args.steps)
        print(f"{variant}: {sum(seen.values())} synchronizing calls in {args.steps} steps")
        for where, n in seen.most_common():
            print(f"  {n:5d}  {where}")


if __name__ == "__main__":
    main()
