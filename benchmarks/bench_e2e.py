"""End-to-end throughput of timm RoPE ViTs: timm's own attention vs attnhub-patched, eager and torch.compile.

    python benchmarks/bench_e2e.py                                   # H100: B=256, 224 px, both ViTs
    python benchmarks/bench_e2e.py --device cpu --batch 2 --img 64 --rep 5 --depth 2 --compile-backend eager
    python benchmarks/bench_e2e.py --models naflexvit_base_patch16_gap --model-kwargs '{"rope_type": "axial"}' \
        --batch 64 --seq-len 576 --modes train       # variable-resolution batches (NaFlex, 10-40% padding)
    python benchmarks/bench_e2e.py --models vit_base_patch16_rope_224 --img 384 --batch 64 --modes train \
        --model-kwargs '{"attn_type": "rope", "num_kv_heads": 4, "qkv_fused": false}'   # grouped k/v heads
    python benchmarks/bench_e2e.py ... --triton-configs '{"bwd_swap_tail": true}'   # a candidate config table

For each model, mode and variant one fresh model (random weights, same seed) runs:
  train  forward + backward + AdamW step under bf16 autocast (cross-entropy on random labels)
  infer  forward under torch.no_grad() and bf16 autocast
Variants: timm | attnhub (`attnhub.integrations.timm.patch`), each eager and `torch.compile` (--compile-mode, not
fullgraph: attnhub's dispatch may break the graph; the breaks are counted and recorded). Each time is the median
step time of `attnhub.benchkit.time_ms` (triton.testing.do_bench with --warmup and --rep budgets in ms;
perf_counter on the CPU); with --rounds R the two variants of a model and mode live together and are timed in R
alternating rounds (timm first, then attnhub first, ...), each time the median of its rounds, so a GPU clock that
drifts over the run weighs on both; the first call is timed apart (compilation included); each record also counts, per
timed step, Python's garbage collections and, on CUDA, the caching allocator's retries and cudaMallocs
(`host_events`: what can make a step wait on the host). Before timing, each model's
patched and timm logits and gradients are compared (relative L2, bf16 autocast). Ratios: timm ms / attnhub ms
(> 1: attnhub faster), eager vs eager and compiled vs compiled. The JSON (--out) holds the date, the environment
(`benchkit.environment`), the config, the checks, every record and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import attnhub
from attnhub import benchkit
from attnhub.backends.triton_fa_rope import configs
from attnhub.integrations import timm as attnhub_timm

MODELS = ("vit_small_patch16_rope_224", "vit_base_patch16_rope_224")
MODES = ("train", "infer")
VARIANTS = ("timm", "attnhub")


def build(name: str, variant: str, args, device: torch.device, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"depth": args.depth} if args.depth else {}
    if not _naflex(name):  # NaFlexVit takes patches of any grid, not an image size
        extra["img_size"] = args.img
    model = timm.create_model(name, pretrained=False, **extra, **args.model_kwargs, **kwargs).to(device)
    return attnhub_timm.patch(model) if variant == "attnhub" else model


def image_batch(batch: int, img: int, device: torch.device, generator: torch.Generator | None = None):
    """Images [batch, 3, img, img] and class labels [batch] for a train step, from `generator` (default: seed 1, the
    same batch in every process)."""
    g = generator or torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, img, img, generator=g).to(device)
    return images, torch.randint(0, 1000, (batch,), generator=g).to(device)


def _naflex(name: str) -> bool:
    return name.startswith("naflexvit")


# patch grids of a NaFlex batch: aspect ratios from 1:2 to 2:1, each 0.6-0.9 of the bucket length
_GRIDS = ((0.75, 1.0), (1.0, 0.75), (0.5, 1.6), (1.6, 0.5), (0.85, 0.85), (0.65, 1.2), (1.2, 0.65), (0.8, 0.9))


def naflex_batch(batch: int, seq_len: int, patch: int = 16, generator=None) -> dict[str, torch.Tensor]:
    """A batch as timm's NaFlexCollator pads it: {"patches": [B, L, patch*patch*3], "patch_coord": [B, L, 2] (y, x),
    "patch_valid": [B, L]}, valid patches a row-major prefix of each sample's own grid (10-40% padding)."""
    side = seq_len**0.5
    patches = torch.randn(batch, seq_len, patch * patch * 3, generator=generator)
    coord = torch.zeros(batch, seq_len, 2, dtype=torch.long)
    valid = torch.zeros(batch, seq_len, dtype=torch.bool)
    for b in range(batch):
        fy, fx = _GRIDS[b % len(_GRIDS)]
        gh, gw = max(1, int(side * fy)), max(1, int(side * fx))
        while gh * gw > 0.9 * seq_len:
            gw -= 1
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coord[b, : gh * gw] = torch.stack([ys.flatten(), xs.flatten()], -1)
        valid[b, : gh * gw] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def _rows(x, n: int):
    """The first n samples of an image batch or a NaFlex dict."""
    return {k: t[:n] for k, t in x.items()} if isinstance(x, dict) else x[:n]


def step_fn(model, mode: str, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """One benchmark step: a closure over the model (eager or compiled), its optimizer and the batch."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if mode == "infer":
        model.eval()

        def infer():
            with torch.no_grad(), autocast:
                return model(x)

        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return train


def chosen_backend(model, mode: str, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> str:
    """`attnhub.explain` of the first attention call of one eager step of a patched model."""
    seen = []
    real, real_packed = attnhub.attention, attnhub.attention_packed

    def spy(q, k, v, rope=None, **kw):
        if not seen:
            seen.append(str(attnhub.explain(q, k, v, rope, key_padding_mask=kw.get("key_padding_mask"))))
        return real(q, k, v, rope, **kw)

    def spy_packed(qkv, rope=None, **kw):  # a fused projection: explained on its views
        if not seen:
            seen.append(str(attnhub.explain(*qkv.permute(2, 0, 3, 1, 4).unbind(0), rope,
                                            key_padding_mask=kw.get("key_padding_mask"))))
        return real_packed(qkv, rope, **kw)

    attnhub.attention, attnhub.attention_packed = spy, spy_packed
    try:
        step_fn(copy.deepcopy(model), mode, x, y, device)()
    finally:
        attnhub.attention, attnhub.attention_packed = real, real_packed
    return seen[0] if seen else "no attnhub call"


def check(name: str, args, device: torch.device, x: torch.Tensor) -> dict:
    """Relative L2 of attnhub-patched vs timm (eager, bf16 autocast, first 32 images): logits without grad, and
    the gradient of block 0's attention input projection after backward of sum(logits * w)."""
    x = _rows(x, 32)
    n = (x["patches"] if isinstance(x, dict) else x).shape[0]
    w = torch.randn(n, 1000, generator=torch.Generator().manual_seed(2)).to(device)
    out = {}
    try:
        got = {}
        for variant in VARIANTS:
            # layer scale 1: timm's initial 1e-5 would hide the attention branch in the logits
            model = build(name, variant, args, device, init_values=1.0)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                with torch.no_grad():
                    logits = model(x).float()
                (model(x).float() * w).sum().backward()
            attn = model.blocks[0].attn
            proj = attn.qkv if attn.qkv is not None else attn.q_proj
            got[variant] = (logits, proj.weight.grad.float())
        out = {"logits_rel_l2": benchkit.rel_l2(got["attnhub"][0], got["timm"][0]),
               "qkv_grad_rel_l2": benchkit.rel_l2(got["attnhub"][1], got["timm"][1])}
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    return {"model": name, **out}


@contextlib.contextmanager
def host_events(device: torch.device):
    """What can stall the host inside a timed loop, counted: Python's garbage collections (per generation) and their
    pause, and on CUDA the caching allocator's retries (it freed cached blocks to satisfy a request) and its device
    allocations (cudaMalloc). A compiled step whose wall time exceeds its GPU time waits on the host: these say
    whether either of them is the host's business then."""
    events = {"gc_collections": [0, 0, 0], "gc_pause_ms": 0.0}
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            events["gc_collections"][info["generation"]] += 1
            started[0] = time.perf_counter()
        else:
            events["gc_pause_ms"] += (time.perf_counter() - started[0]) * 1e3

    def allocator() -> dict:
        return torch.cuda.memory_stats(device) if device.type == "cuda" else {}

    before = allocator()
    gc.callbacks.append(on_gc)
    try:
        yield events
    finally:
        gc.callbacks.remove(on_gc)
        after = allocator()
        for key in ("num_alloc_retries", "num_device_alloc"):
            if key in after:
                events[key] = after[key] - before.get(key, 0)


def _per_step(events: dict, steps: int) -> dict:
    return {k: ([round(c / steps, 3) for c in v] if isinstance(v, list) else round(v / steps, 4))
            for k, v in events.items()}


class Variant:
    """One variant's model and step, built and called once (the first call timed apart, compilation included);
    `time` adds a timed round (`benchkit.time_ms`) to its record, `close` frees the model. A failing variant (OOM,
    compile error) keeps the error in its record and is not timed; the others still run."""

    def __init__(self, name: str, mode: str, variant: str, compiled: bool, args, device, x, y):
        self.rec = {"model": name, "mode": mode, "variant": variant, "compiled": compiled}
        self.args, self.device, self.batch = args, device, len(y)
        self.model = self.fn = None
        self.events, self.steps = {}, 0
        try:
            model = build(name, variant, args, device)
            if variant == "attnhub" and not compiled:
                self.rec["attnhub_explain"] = chosen_backend(model, mode, x, y, device)
            if compiled:
                model = torch.compile(model, backend=args.compile_backend,
                                      mode=args.compile_mode if args.compile_backend == "inductor" else None)
            self.model, self.fn = model, step_fn(model, mode, x, y, device)
            breaks = _graph_breaks()
            start = time.perf_counter()
            self.fn()
            benchkit.sync(device)
            self.rec["first_call_s"] = time.perf_counter() - start
            if compiled:
                self.rec["graph_breaks"] = _graph_breaks() - breaks
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        self.rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        self.model = self.fn = None

    def time(self) -> None:
        if self.fn is None:
            return
        fn, steps = self.fn, [0]

        def counted():
            steps[0] += 1
            fn()

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            if self.args.gc_freeze:  # what exists now (models, compiled code) leaves the collector's generations
                gc.collect()
                gc.freeze()
            with host_events(self.device) as events:
                self.rec.setdefault("round_ms", []).append(
                    benchkit.time_ms(counted, device=self.device, warmup=self.args.warmup, rep=self.args.rep))
        except Exception as exc:
            self.fail(exc)
            return
        finally:
            gc.unfreeze()
        self.steps += steps[0]
        self.events = _summed(self.events, events)
        self.rec["ms"] = statistics.median(self.rec["round_ms"])
        self.rec["img_per_s"] = self.batch / self.rec["ms"] * 1e3
        self.rec["host_events_per_step"] = _per_step(self.events, self.steps)
        if self.device.type == "cuda":  # with --rounds the other variant's model and optimizer state count too
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.rec["peak_mem_gib"] = max(peak, self.rec.get("peak_mem_gib", 0.0))

    def close(self) -> dict:
        self.model = self.fn = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.rec


def _summed(total: dict, events: dict) -> dict:
    """host_events counts of several rounds added up (lists element-wise)."""
    add = lambda a, b: [x + y for x, y in zip(a, b)] if isinstance(b, list) else a + b  # noqa: E731
    return {k: add(total[k], v) if k in total else v for k, v in events.items()}


def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def measure_pair(name: str, mode: str, compiled: bool, args, device, x, y) -> list[dict]:
    """timm's and attnhub's records for one model, mode and compile setting. One round (the default): each variant
    built, timed and freed in turn. --rounds R > 1: both built, then timed in R rounds, timm first in even rounds
    and attnhub first in odd ones, so drift of the GPU's clock over the run falls on both alike; `ms` is the median
    of a variant's rounds (`round_ms`)."""
    if args.rounds == 1:
        records = []
        for variant in VARIANTS:
            if compiled:
                torch._dynamo.reset()
            v = Variant(name, mode, variant, compiled, args, device, x, y)
            v.time()
            records.append(v.close())
        return records
    if compiled:
        torch._dynamo.reset()
    pair = [Variant(name, mode, variant, compiled, args, device, x, y) for variant in VARIANTS]
    for r in range(args.rounds):
        for v in pair if r % 2 == 0 else pair[::-1]:
            v.time()
    return [v.close() for v in pair]


def ratios(records: list[dict]) -> list[dict]:
    """timm ms / attnhub ms per model and mode, eager vs eager and compiled vs compiled; with several rounds also
    each round's (`<key>_rounds`: round r's timm over round r's attnhub, the spread of the ratio)."""
    by = {(r["model"], r["mode"], r["variant"], r["compiled"]): r for r in records}
    out = []
    for name, mode in dict.fromkeys((r["model"], r["mode"]) for r in records):
        row = {"model": name, "mode": mode}
        for compiled, key in ((False, "attnhub_eager_vs_timm_eager"), (True, "attnhub_compiled_vs_timm_compiled")):
            timm_rec, ours = by.get((name, mode, "timm", compiled), {}), by.get((name, mode, "attnhub", compiled), {})
            row[key] = timm_rec["ms"] / ours["ms"] if timm_rec.get("ms") and ours.get("ms") else None
            rounds = list(zip(timm_rec.get("round_ms", ()), ours.get("round_ms", ())))
            if row[key] and len(rounds) > 1:
                row[key + "_rounds"] = [t / a for t, a in rounds]
        out.append(row)
    return out


def print_table(report: dict) -> None:
    head = f"{'model':<28} {'mode':<6} {'variant':<8} {'compiled':<8} {'ms':>9} {'img/s':>9} {'breaks':>6}  first s"
    print(head)
    print("-" * len(head))
    for r in report["records"]:
        if "error" in r:
            cells = f"error: {r['error'][:70]}"
        else:
            cells = (f"{r['ms']:9.2f} {r['img_per_s']:9.1f} {str(r.get('graph_breaks', '')):>6}  "
                     f"{r['first_call_s']:.1f}")
        print(f"{r['model']:<28} {r['mode']:<6} {r['variant']:<8} {str(r['compiled']):<8} {cells}")
    print()
    for c in report["checks"]:
        print(f"{c['model']:<28} attnhub vs timm (bf16): " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else
                                                                   f"{k} {v}" for k, v in c.items() if k != "model"))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}x"  # noqa: E731
    spread = lambda v: f" (rounds {min(v):.3f}-{max(v):.3f}x)" if v else ""  # noqa: E731
    for r in report["ratios"]:
        eager, comp = "attnhub_eager_vs_timm_eager", "attnhub_compiled_vs_timm_compiled"
        print(f"{r['model']:<28} {r['mode']:<6} attnhub vs timm: "
              f"eager {fmt(r[eager])}{spread(r.get(eager + '_rounds'))}, compiled {fmt(r[comp])}{spread(r.get(comp + '_rounds'))}  (timm ms / attnhub ms)")


def run(args) -> dict:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    images, y = image_batch(args.batch, args.img, device, g)
    compiled_opts = (False,) if args.no_compile else (True,) if args.compile_only else (False, True)
    records, checks = [], []
    for name in args.models:
        x = images
        if _naflex(name):
            x = {k: t.to(device) for k, t in naflex_batch(args.batch, args.seq_len, generator=g).items()}
        checks.append(check(name, args, device, x))
        print(f"  {name} check (attnhub vs timm, bf16): {checks[-1]}", file=sys.stderr)
        for mode in args.modes:
            for compiled in compiled_opts:
                for rec in measure_pair(name, mode, compiled, args, device, x, y):
                    print(f"  {name} {mode} {rec['variant']} compiled={compiled}: "
                          + (rec["error"][:200] if "error" in rec else
                             f"{rec['ms']:.2f} ms (rounds {rec['round_ms']}); per step "
                             f"{rec['host_events_per_step']}"), file=sys.stderr)
                    records.append(rec)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": benchkit.environment(device),
        "config": {"models": list(args.models), "modes": list(args.modes), "batch": args.batch, "img": args.img,
                   "depth": args.depth, "seq_len": args.seq_len, "model_kwargs": args.model_kwargs,
                   "triton_configs": args.triton_configs,
                   "warmup_ms": args.warmup, "rep_ms": args.rep, "rounds": args.rounds, "autocast": "bfloat16",
                   "optimizer": "AdamW", "gc_freeze": args.gc_freeze, "compile": None if args.no_compile else
                   {"mode": args.compile_mode, "fullgraph": False, "backend": args.compile_backend}},
        "checks": checks,
        "records": records,
        "ratios": ratios(records),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--models", type=csv, default=list(MODELS), help="comma-separated timm model names")
    p.add_argument("--modes", type=csv, default=list(MODES), help="train,infer")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--img", type=int, default=224, help="image size in pixels")
    p.add_argument("--depth", type=int, default=None, help="override the number of blocks (quick checks)")
    p.add_argument("--seq-len", type=int, default=576, help="NaFlex models (naflexvit_*): the bucket length L")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='JSON keyword arguments of timm.create_model, e.g. \'{"attn_type": "rope", "num_kv_heads": 4, '
                        '"qkv_fused": false}\' (grouped k/v heads)')
    p.add_argument("--triton-configs", type=json.loads, default={},
                   help='JSON fields of triton_fa_rope\'s configs to override for the whole run (configs.override), '
                        'e.g. \'{"bwd_swap_tail": true}\': a candidate table against timm in one run')
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=500, help="untimed steps after the first call, ms (do_bench)")
    p.add_argument("--rep", type=int, default=2000, help="timed steps, ms (do_bench; the median is reported)")
    p.add_argument("--rounds", type=int, default=1,
                   help="timed rounds per variant; > 1: timm and attnhub alive together, timed in alternation "
                        "(ABBA...), each variant's ms the median of its rounds")
    compile_opts = p.add_mutually_exclusive_group()
    compile_opts.add_argument("--no-compile", action="store_true", help="eager only")
    compile_opts.add_argument("--compile-only", action="store_true", help="torch.compile only")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() after each model's first step: the timed steps' collections skip what existed")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a fast smoke test)")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode (inductor); reduce-overhead replays CUDA graphs")
    p.add_argument("--out", default="benchmarks/results/e2e_h100.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds: {args.rounds}; give 1 or more")
    if unknown := [m for m in args.modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    with configs.override(**args.triton_configs):
        report = run(args)
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}")
    return 1 if any("error" in r for r in report["records"]) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
