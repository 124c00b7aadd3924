"""The Gluon forward for longer sequences (`gluon_fwd.long_fwd_kernel`, 256 < N <= 640) against the forwards that
serve those lengths today, forward only, side by side in one process. Needs a Hopper GPU.

    python benchmarks/gluon_long.py [--shapes "vit_b16_384;custom:64,12,401,64,1,20"] [--out FILE]

Each shape: q, k, v views of one fused qkv projection, bf16, the timm-convention table. The long kernel is checked
against `math` in float64 on its first batch elements first (with `torch.empty` NaN-filling every buffer, so the
whole output must come back finite: no row left unwritten) and the script stops at the first wrong one. Then each
candidate is timed by CUDA-graph replay (the kernels alone) and by `do_bench` (with the host's launch). At lengths
the resident kernel serves (N <= 256) the long one runs too, forced. Then a table of ms and each one's ratio to
cuDNN without RoPE and to timm compiled, and last, per shape and pass, the fastest variant against the long kernel as
its baseline (`summarize`). A variant whose first call does not finish within `HANG_S` seconds ends the run with
every thread's traceback; `--out` is written after every shape, so the shapes before it are kept. The long kernel runs
with one attending partition of two warpgroups ("gluon long": the baseline, its K/V boxes handed back as a whole
after a head) and with the boxes handed back box by box in a head's last slice (`long_early_release`), for inference
with and without RoPE and for training (the forward that also writes the rotated q and k); with `--groups 0,3` (the
default) also with three attending warpgroups as partitions of their own (`long_attend_groups`, with early release:
Hopper's table), and at lengths whose last 64-row slice holds at most 16 rows, that slice swapped (`long_swap_tail`).
Past 640 tokens (`gluon_fwd.MAX_N`) the streaming kernel (`stream_fwd_kernel`: K resident, V through a ring) runs
instead, against the Triton forward that served those lengths before it (forced: "triton forward" for inference,
"triton training" for `launch.forward` writing the rotated q and k; `attnhub:triton_fa_rope` is the table's choice,
the streaming kernel since d477586); with
`--v-slots 2,3,4,5` also with the other depths of its V ring (`stream_v_slots`) where they fit, and with
`--overlap` also with its overlapped key loop (`stream_overlap`), every pass.

    python benchmarks/gluon_long.py --shapes "vit_b16_512_reg4;custom:32,16,785,64,1,28" --v-slots 3,4,5 --overlap \
        --out h200_gluon_stream.json

`--clipped-stores` also times the training forms (the table's variant) with their rotated q and k stored through
descriptors of one head's [1, 1, N, D] buffer, which TMA clips for every other head (`_stores_clipped`): the
kernel's whole work but those HBM writes, a timing ablation (rows "..., stores clipped", in no pass's summary).

    python benchmarks/gluon_long.py --shapes "vit_b16_384;vit_b16_512_reg4" --groups 3 --clipped-stores

Up to 256 tokens the resident kernel runs for inference (with and without RoPE) and training, as shipped and
warp-specialized (`resident_warp_specialized`, rows "..., ws"); `--groups ""` leaves the long kernel out there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import functools
import json

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

import attnhub
from attnhub import bench, benchkit
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends.triton_fa_rope import configs, gluon_fwd, launch
from attnhub.backends.triton_fa_rope.configs import LONG_ATTEND_GROUPS, STREAM_V_SLOTS, GluonOptions
from attnhub.tolerances import bound, rel_l2


HANG_S = 90  # a first call (compile and run) that takes longer is taken for a kernel that never finishes


def _check(name, fn, q, k, v, table, n_ref=4) -> float:
    # an untested kernel waiting on a barrier forever would hold the device call until its time limit: exit instead,
    # with every thread's traceback, the rows timed so far already printed (and written, `main`)
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    print(f"  checking {name} ...", flush=True)
    with benchkit.nan_empty():
        o = fn()
    torch.cuda.synchronize()
    faulthandler.cancel_dump_traceback_later()
    if not torch.isfinite(o).all():
        raise SystemExit(f"{name}: non-finite output (a row left unwritten?)")
    ref = attnhub.attention(q[:n_ref].double(), k[:n_ref].double(), v[:n_ref].double(), table, backend="math")
    err = rel_l2(o[:n_ref], ref)
    if not err <= bound(o.dtype):
        raise SystemExit(f"{name}: rel_l2 error {err:.2e} against float64 > {bound(o.dtype):.1e}")
    return err


def _long_o(q, k, v, table, qk_scale, save_rotated, early_release, groups, swap_tail=False):
    """o of the long kernel, at any length it serves (`gluon_fwd.LONG_MIN_N` tokens on)."""
    options = GluonOptions(early_release, gluon_fwd.LONG_MIN_N, groups, swap_tail)
    return gluon_fwd.forward(q, k, v, table, qk_scale, runtime.launch, save_rotated, options)[0]


def _stream_o(q, k, v, table, qk_scale, save_rotated, v_slots, overlap):
    """o of the streaming kernel (past `gluon_fwd.MAX_N` tokens, whatever the config table says) with a ring of
    v_slots V boxes, its key loop overlapped or not."""
    assert q.shape[2] > gluon_fwd.MAX_N
    options = GluonOptions(v_slots=v_slots, overlap=overlap)
    return gluon_fwd.forward(q, k, v, table, qk_scale, runtime.launch, save_rotated, options)[0]


def _resident_o(q, k, v, table, qk_scale, save_rotated, ws):
    """o of the resident kernel (N <= 256), as shipped or warp-specialized (`resident_warp_specialized`)."""
    options = GluonOptions(resident_ws=ws)
    return gluon_fwd.forward(q, k, v, table, qk_scale, runtime.launch, save_rotated, options)[0]


CLIPPED = ", stores clipped"  # the ablation's rows (`_stores_clipped`)


def _stores_clipped(q, k, v, table, options: GluonOptions):
    """-> a context manager: within it, a training call of this signature (`gluon_fwd.forward` with save_rotated)
    stores its rotated q and k through descriptors of one head's [1, 1, N, D] buffer, and TMA clips every box of the
    other heads, so the kernel does all its work but the HBM writes of the rotated q and k. A timing ablation: what
    the call returns as the rotated q and k is not written. The plan's makers are swapped within the block for
    makers of the small buffer (the plan's own, given it, would copy the full tensor's shape); the buffer lives as
    long as the context manager (a CUDA graph captured within keeps writing it)."""
    plan = gluon_fwd._plan(q, k, v, table, gluon_fwd._tables(table, q.dtype)[0], True, options)
    one = torch.empty(1, 1, q.shape[2], q.shape[3], device=q.device, dtype=q.dtype)
    rows = [make(torch.empty_like(q)).block_shape[1] for make in plan.make_rot]
    clipped = tuple(lambda _t, make=gluon_fwd._maker(one, r): make(one) for r in rows)

    @contextlib.contextmanager
    def swapped():
        saved, plan.make_rot = plan.make_rot, clipped
        try:
            yield
        finally:
            plan.make_rot = saved

    return swapped


def _triton_o(q, k, v, table, scale, save_rotated, triton_only):
    """o of the Triton forward past `gluon_fwd.MAX_N` tokens; triton_only: the table with its Gluon forwards capped
    at MAX_N (made once, outside the timed call)."""
    return launch.forward(q, k, v, table, scale, save_rotated, triton_only)[0]


def run_shape(s: benchkit.Shape, groups=(0,), v_slots=(4,), overlap=False, clipped=False) -> list[dict]:
    dev = torch.device("cuda")
    qkv = torch.randn(s.B, s.N, 3, s.H, s.D, device=dev, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    table = benchkit.rope_table(s, dev)
    qk_scale = s.D ** -0.5 * launch.LOG2E
    rows = []

    def add(name, fn, context=contextlib.nullcontext, rope=True, err=None):
        def call():
            with context():
                return fn()
        with torch.no_grad():
            rows.append(dict(shape=s.name, impl=name, rope=rope, rel_l2=err,
                             graph_ms=do_bench_cudagraph(call, rep=100, return_mode="median"),
                             bench_ms=do_bench(call, warmup=25, rep=100, return_mode="median")))
        print(f"  {s} {name}: graph {rows[-1]['graph_ms']:.4f} ms, do_bench {rows[-1]['bench_ms']:.4f} ms",
              flush=True)

    with torch.no_grad():
        fn = lambda: gluon_fwd.forward(q, k, v, table, qk_scale, runtime.launch)[0]  # noqa: E731
        no_rope = lambda: gluon_fwd.forward(q, k, v, None, qk_scale, runtime.launch)[0]  # noqa: E731
        stream = s.N > gluon_fwd.MAX_N
        if stream:  # the streaming kernel, and the Triton training forward the table runs here
            config = configs.for_call(dev, s.D)
            table_slots, table_overlap = config.stream_v_slots, config.stream_overlap
            passes = ((True, False), (False, False), (True, True))  # (rope, save_rotated)
            # (rope, save_rotated, ring depth, overlap): the table's depth every way, the others with RoPE; the other
            # key loop every way
            variants = [(rope, save, table_slots, table_overlap) for rope, save in passes]
            variants += [(True, save, n, table_overlap) for n in v_slots if n != table_slots for save in (False, True)
                         if gluon_fwd.stream_v_slots(s.N, n) == n]
            variants += [(rope, save, table_slots, not table_overlap) for rope, save in passes if overlap]
            for rope, save, n, over in variants:
                name = (f"gluon stream{' training' if save else ''}{'' if n == table_slots else f', {n} V slots'}"
                        f"{'' if over == table_overlap else ', overlapped' if over else ', not overlapped'}"
                        f"{'' if rope else ', no RoPE'}")
                fn = functools.partial(_stream_o, q, k, v, table if rope else None, qk_scale, save, n, over)
                err = _check(name, fn, q, k, v, table if rope else None)
                add(name, fn, rope=rope, err=err)
            if clipped:
                fn = functools.partial(_stream_o, q, k, v, table, qk_scale, True, table_slots, table_overlap)
                options = GluonOptions(v_slots=table_slots, overlap=table_overlap)
                add("gluon stream training" + CLIPPED, fn, _stores_clipped(q, k, v, table, options))
            triton_only = dataclasses.replace(config, resident_fwd_max_n=gluon_fwd.MAX_N,
                                              resident_train_max_n=gluon_fwd.MAX_N)
            for name, save in (("triton forward", False), ("triton training", True)):
                fn = functools.partial(_triton_o, q, k, v, table, s.D ** -0.5, save, triton_only)
                add(name, fn, err=_check(name, fn, q, k, v, table))
        elif s.N <= gluon_fwd.RESIDENT_MAX_N:  # the kernel serving this length, then the long one forced
            add("gluon resident", fn, err=_check("gluon resident", fn, q, k, v, table))
            add("gluon resident, no RoPE", no_rope, rope=False)
            # the training form, then warp-specialized (`resident_warp_specialized`; "..., ws": the summary's
            # variants of their pass): (name, RoPE, training, warp-specialized)
            for name, rope, save, ws in (("gluon resident training", True, True, False),
                                         ("gluon resident, ws", True, False, True),
                                         ("gluon resident, ws, no RoPE", False, False, True),
                                         ("gluon resident training, ws", True, True, True)):
                fn = functools.partial(_resident_o, q, k, v, table if rope else None, qk_scale, save, ws)
                add(name, fn, rope=rope, err=_check(name, fn, q, k, v, table if rope else None))
        # (rope, save_rotated: the training forward, which writes the rotated q and k too, early release, groups,
        # swapped tail: with groups where the last 64-row slice holds at most 16 rows); groups need early release
        # (each row is a kernel of its own to compile)
        swaps = 0 < s.N % gluon_fwd.GROUP_SLICE <= gluon_fwd.TAIL_ROWS
        long_variants = [] if stream else [(rope, save, early, g, tail) for g in groups
                                           for rope, save in ((True, False), (False, False), (True, True))
                                           for early, tail in ((False, False), (True, False), (True, True))
                                           if (not tail or (g and rope and swaps)) and (not g or early)]
        for rope, save, early, g, tail in long_variants:
            name = (f"gluon long{' training' if save else ''}{f', {g} groups' if g else ''}"
                    f"{', early release' if early else ''}{', swapped tail' if tail else ''}"
                    f"{'' if rope else ', no RoPE'}")
            fn = functools.partial(_long_o, q, k, v, table if rope else None, qk_scale, save, early, g, tail)
            err = _check(name, fn, q, k, v, table if rope else None)
            print(f"  {s} {name}: rel_l2 vs float64 {err:.2e}", flush=True)
            add(name, fn, rope=rope, err=err)
            if clipped and save:
                options = GluonOptions(early, gluon_fwd.LONG_MIN_N, g, tail)
                add(name + CLIPPED, fn, _stores_clipped(q, k, v, table, options))
    for impl in ("attnhub", "attnhub:triton_fa_rope", "attnhub:triton_rope_sdpa", "sdpa_cudnn", "timm_compiled"):
        built = bench.build(impl, s, dev)
        add(impl + ("" if built.rope else " (no RoPE)"), lambda: built.fn(q, k, v), built.context, built.rope)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per shape and pass (inference with RoPE, without, the training forward): the long kernel's baseline, one
    attending partition without early release ("gluon long", "gluon long, no RoPE", "gluon long training"),
    against its fastest variant, by graph time, with cuDNN without RoPE and timm compiled against that variant; past
    640 tokens the Triton forward ("triton forward", "triton training") against the streaming kernel. The ablation's
    rows (`CLIPPED`) are no pass's variants."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        here = {r["impl"]: r["graph_ms"] for r in rows if r["shape"] == shape}
        for kind, baseline in (("inference", "gluon resident"), ("training", "gluon resident training"),
                               ("no RoPE", "gluon resident, no RoPE"),
                               ("inference", "gluon long"), ("no RoPE", "gluon long, no RoPE"),
                               ("training", "gluon long training"), ("inference", "triton forward"),
                               ("training", "triton training")):
            # the long kernel's variants against its baseline; the streaming kernel against the Triton forward
            if baseline not in here or baseline.startswith("gluon") == ("gluon stream" in here):
                continue
            kernel = "gluon stream" if "gluon stream" in here else baseline.split(",")[0]
            same_kind = [name for name in here if (name.startswith(kernel) or name == baseline)
                         and CLIPPED not in name and name.endswith(", no RoPE") == (kind == "no RoPE")
                         and (" training" in name) == (kind == "training")]
            best = min(same_kind, key=here.__getitem__)
            out.append(dict(shape=shape, kind=kind, baseline_ms=here[baseline], best=best, best_ms=here[best],
                            speedup=here[baseline] / here[best],
                            cudnn_over_best=here.get("sdpa_cudnn (no RoPE)", float("nan")) / here[best],
                            timm_over_best=here.get("timm_compiled", float("nan")) / here[best]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help="semicolon list of shapes (`benchkit.parse_shape`)",
                   default="vit_b16_384;custom:64,12,401,64,1,20;custom:64,12,257,64,1,16;vit_b16_224;vit_s16_224")
    p.add_argument("--groups", default="0,3", help="comma list of the long kernel's attending groups to time "
                   "(`long_attend_groups`: 0, 3; empty: the long kernel not at all)")
    p.add_argument("--v-slots", default="4", help="comma list of the streaming kernel's V ring depths to time past "
                   "640 tokens (`stream_v_slots`: 2-5; those that fit)")
    p.add_argument("--overlap", action="store_true", help="past 640 tokens also time the streaming kernel's other "
                   "key loop (`stream_overlap`)")
    p.add_argument("--clipped-stores", action="store_true", help="also time the training forms with their rotated q "
                   "and k stores clipped by TMA (`_stores_clipped`: the price of those writes)")
    p.add_argument("--out", help="write the rows and the environment as JSON")
    args = p.parse_args(argv)
    groups = tuple(int(g) for g in args.groups.split(",") if g)
    bad = [g for g in groups if g not in LONG_ATTEND_GROUPS]
    if bad:
        p.error(f"--groups {args.groups}: {bad} not among {LONG_ATTEND_GROUPS}")
    env = benchkit.environment("cuda")
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}", flush=True)
    v_slots = tuple(int(n) for n in args.v_slots.split(","))
    bad = [n for n in v_slots if n not in STREAM_V_SLOTS]
    if bad:
        p.error(f"--v-slots {args.v_slots}: {bad} not among {STREAM_V_SLOTS}")
    rows = []
    for spec in args.shapes.split(";"):
        rows += run_shape(benchkit.parse_shape(spec), groups, v_slots, args.overlap, args.clipped_stores)
        if args.out:  # after every shape: a run cut short keeps what it measured
            with open(args.out, "w") as fh:
                json.dump(dict(environment=env, rows=rows, complete=False), fh, indent=1)
    print(f"\n{'shape':<22} {'implementation':<42} {'graph ms':>9} {'do_bench':>9} {'cuDNN/it':>9} {'timm c/it':>9}")
    for r in rows:
        base = {x["impl"]: x["graph_ms"] for x in rows if x["shape"] == r["shape"]}
        cudnn, timm = base.get("sdpa_cudnn (no RoPE)"), base.get("timm_compiled")
        print(f"{r['shape']:<22} {r['impl']:<42} {r['graph_ms']:>9.4f} {r['bench_ms']:>9.4f} "
              f"{cudnn / r['graph_ms']:>9.3f} {timm / r['graph_ms']:>9.3f}")
    summary = summarize(rows)
    print(f"\n{'shape':<22} {'pass':<10} {'baseline':>10} {'fastest variant':<52} {'ms':>8} {'x':>6} "
          f"{'cuDNN/it':>9} {'timm c/it':>9}")
    for r in summary:
        print(f"{r['shape']:<22} {r['kind']:<10} {r['baseline_ms']:>10.4f} {r['best']:<52} {r['best_ms']:>8.4f} "
              f"{r['speedup']:>6.3f} {r['cudnn_over_best']:>9.3f} {r['timm_over_best']:>9.3f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(environment=env, rows=rows, summary=summary, complete=True), fh, indent=1)


if __name__ == "__main__":
    from attnhub import settings

    with settings.override(background_compile=False):  # each kernel timed from its first call (do_bench, graphs)
        main()
