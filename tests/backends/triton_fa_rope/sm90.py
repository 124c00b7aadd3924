"""The triton_fa_rope kernels compiled for Hopper (sm_90) offline, without a GPU: what the launcher really launches.

`training_step_launches` runs the backend's own launcher (`launch.forward`, `launch.backward`) on CPU tensors with a
recording launcher and the config table of the target, so every recorded launch carries the exact arguments,
compile-time parameters and launch options a GPU call would. `compile_launch` compiles one for sm_90 with
`triton.compile(..., target=GPUTarget("cuda", 90, 32))` (Triton's own specialization: ints equal to 1 become
constants, pointers and ints divisible by 16 get the divisibility hint) and reports shared memory, registers and
spills (ptxas -v on the PTX) and the instruction mix that tells how K and V reach the tensor cores (wgmma, cp.async,
TMA, plain global loads, ldmatrix, ex2). A GPU measures speed; this says what the compiler made of each variant.

Usage (from the repository root):
    python -m tests.backends.triton_fa_rope.sm90 --matrix
        every launch of `matrix_jobs` (head dims, dtypes, layouts, per-head and cross attention, variants, the
        Gluon kernels) must compile
        and fit the shared memory of an sm_90 block; exit 1 otherwise. CI runs this (test_sm90.py next to this
        file): it has no GPU, and the interpreter compiles nothing.
    python -m tests.backends.triton_fa_rope.sm90 --same-ttir OLD_KERNELS_PY
        every Triton launch of `MATRIX` compiles to the same TTIR with this checkout's kernels as with those of
        another kernels.py (a refactor checked without a GPU); exit 1 where one differs.
    python -m tests.backends.triton_fa_rope.sm90 --same-ir REV
        the same for every Triton and Gluon launch of the matrix (the Gluon forwards and backward included)
        against the kernel files of git revision REV: TTIR, and TTGIR for Gluon kernels; a launch with a switch
        REV's kernel lacks is compared with the switch off, and listed as new when it is on.
    python -m tests.backends.triton_fa_rope.sm90 --out FILE
        ViT-S/16 bf16: each forward variant and the backward, with registers, spills and instruction mix (the sm_90
        record in benchmarks/results/ was made this way).
Triton must not be in interpreter mode (TRITON_INTERPRET unset): the kernels must be compilable JIT functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnhub import CosSinTable
from attnhub.backends.triton_fa_rope import configs
from attnhub.backends.triton_fa_rope import launch as launcher
from attnhub.backends import _triton_runtime as runtime
from attnhub.backends._triton_runtime import Launch

H100_SHARED_BYTES = 232_448  # 227 KiB: the most dynamic shared memory one block may use on sm_90
_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8",
            torch.int32: "*i32"}
_PTX_COUNTS = {"wgmma": r"wgmma\.mma_async", "mma_sync": r"\bmma\.sync", "cp_async": r"cp\.async\.(?:ca|cg)",
               "tma_load": r"cp\.async\.bulk\.tensor", "ld_global": r"\bld\.global", "st_shared": r"\bst\.shared",
               "ldmatrix": r"ldmatrix", "ex2": r"ex2\.approx",
               "wait_group_1": r"wgmma\.wait_group\.sync\.aligned\s+1\b",  # an MMA left in flight
               "store_wait": r"cp\.async\.bulk\.wait_group"}  # waits for TMA stores


def training_step_launches(q, k, v, rope, mask=None, arch: int = 9, bwd: str = "split", **config) -> list[Launch]:
    """Every launch of an inference forward, a training forward and its backward (`bwd`: the backward path asked
    for, "split" or "fused", decided as a call decides it: `launch.use_fused_backward`) with the
    config table of compute capability `arch` (`config` replaces its fields, e.g. prerotate_from_n=0) and the key
    padding mask `mask` (or None), recorded instead of run."""
    scale = q.shape[-1] ** -0.5
    cfg = dataclasses.replace(configs.for_arch(arch, q.shape[-1]), **config)
    launches: list[Launch] = []

    def record(kernel, grid, args, num_warps, num_stages, **constexprs):
        launches.append(Launch(kernel, grid, args, num_warps, num_stages, constexprs))

    launcher.forward(q, k, v, rope, scale, False, cfg, record, mask)
    o, lse, (qs, ks) = launcher.forward(q, k, v, rope, scale, True, cfg, record, mask)
    fused = launcher.use_fused_backward(cfg, q, k, rope, mask, bwd)
    launcher.backward(torch.empty_like(q), qs, ks, v, o, lse, rope, scale, cfg, fused, record, mask)
    return launches


OPTIONS = ("maxnreg",)  # launch keywords that are compile options (`KernelConfig.options`), not kernel parameters


def _constexprs(launch: Launch) -> dict:
    return {name: value for name, value in launch.constexprs.items() if name not in OPTIONS}


def _specialize(launch: Launch):
    """(signature, constants, attrs) for `ASTSource`, as Triton's JIT would specialize this launch."""
    params = launch.kernel.params
    constexprs = _constexprs(launch)
    if len(launch.args) + len(constexprs) != len(params):
        raise TypeError(f"{launch.name}: {len(launch.args)} arguments + {len(constexprs)} constexprs for "
                        f"{len(params)} parameters")
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, (p, a) in enumerate(zip(params, launch.args)):
        if p.is_constexpr:
            raise TypeError(f"{launch.name}: run-time argument {i} lands on constexpr parameter {p.name}")
        if hasattr(a, "block_shape"):  # a Gluon TensorDescriptor: its dtype, block and shared layout are the type
            block = ",".join(map(str, a.block_shape))
            sig[p.name] = f"tensordesc<{_POINTER[a.base.dtype][1:]}[{block}],{a.layout!r}>"
        elif isinstance(a, torch.Tensor):
            sig[p.name] = _POINTER[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(a, float):
            sig[p.name] = "fp32"
        elif isinstance(a, int) and not isinstance(a, bool):
            if a == 1 and not p.do_not_specialize:
                sig[p.name], consts[p.name] = "constexpr", 1
                continue
            sig[p.name] = "i32" if -2**31 <= a < 2**31 else "i64"
            if a % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{launch.name}: argument {p.name} of type {type(a).__name__}")
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


def _is_gluon(kernel) -> bool:
    is_gluon = getattr(kernel, "is_gluon", None)  # JITFunction's since Triton 3.5
    return is_gluon is not None and is_gluon()


def compile_launch(launch: Launch, arch: int = 90, ptxas: bool = True) -> dict:
    """Compile one recorded launch for sm_`arch` -> shared bytes, compile seconds (this machine's), PTX instruction
    counts, and with `ptxas` registers and spills."""
    sig, consts, attrs = _specialize(launch)
    start = time.perf_counter()
    source = ASTSource
    if _is_gluon(launch.kernel):
        from triton.experimental.gluon._runtime import GluonASTSource as source
    compiled = triton.compile(source(launch.kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages,
                                           **{k: v for k, v in launch.constexprs.items() if k in OPTIONS}))
    report = dict(compile_s=round(time.perf_counter() - start, 2), shared_bytes=compiled.metadata.shared)
    ptx = compiled.asm["ptx"]
    report.update({name: len(re.findall(pat, ptx)) for name, pat in _PTX_COUNTS.items()})
    if ptxas:
        report.update(_ptxas(ptx))
    return report


# name: (D, dtype, layout or None, table kind, N_kv for cross attention[, varlen: k/v heads, key padding mask]);
# table kind: "shared" [N_grid, D/2], "per_head" [H, ...], "per_sample" [B, 1, ...]
CASES = {
    "d64_bf16_interleaved": (64, torch.bfloat16, "interleaved", "shared", None),
    "d64_bf16_half": (64, torch.bfloat16, "half", "shared", None),
    "d64_bf16_norope_cross": (64, torch.bfloat16, None, "shared", 77),
    "d64_fp16_interleaved": (64, torch.float16, "interleaved", "shared", None),
    "d64_fp32_interleaved": (64, torch.float32, "interleaved", "shared", None),
    "d64_bf16_perhead": (64, torch.bfloat16, "interleaved", "per_head", None),
    "d80_bf16_interleaved": (80, torch.bfloat16, "interleaved", "shared", None),  # BLOCK_D 128: pair loads
    "d128_bf16_half": (128, torch.bfloat16, "half", "shared", None),
    "d256_bf16_interleaved": (256, torch.bfloat16, "interleaved", "shared", None),
    # variable resolution: KEY_MASK, GROUP > 1, BATCHED_TABLE, alone and together
    "d64_bf16_mask": (64, torch.bfloat16, "interleaved", "shared", None, dict(mask=True)),
    "d64_bf16_gqa": (64, torch.bfloat16, "half", "shared", None, dict(h_kv=1)),
    "d64_bf16_per_sample": (64, torch.bfloat16, "interleaved", "per_sample", None),
    "d64_bf16_mask_gqa_per_sample": (64, torch.bfloat16, "interleaved", "per_sample", None, dict(h_kv=1, mask=True)),
    "d80_fp16_mask_gqa": (80, torch.float16, "interleaved", "shared", None, dict(h_kv=1, mask=True)),
    "d128_fp32_mask_norope": (128, torch.float32, None, "shared", None, dict(mask=True)),
}
# name: (launcher config overrides, backward path); every case runs "default" (the Hopper table: at N = 197 the Gluon
# forwards where they apply, else RoPE in the kernel, narrow last K tile), the ViT case every variant
NEVER = dict(prerotate_from_n=None, prerotate_train_from_n=None, resident_train_max_n=0)  # the Triton training
ALWAYS = dict(prerotate_from_n=0, prerotate_train_from_n=0, resident_train_max_n=0)     # forward's variants
VARIANTS = {
    "default": ({}, "split"),
    "fused_backward": ({}, "fused"),
    "short_backward": (dict(bwd_fused=configs.KernelConfig(256, 32, 8, 1)), "fused"),  # N <= 256: one query block
    "prerotate_narrow_tail": (dict(**ALWAYS, narrow_tail=True), "split"),
    "in_kernel_full_tail": (dict(**NEVER, narrow_tail=False), "split"),
}
MATRIX = [(case, "default") for case in CASES] + [("d64_bf16_interleaved", v) for v in VARIANTS if v != "default"]
MATRIX += [("d64_bf16_mask_gqa_per_sample", v) for v in VARIANTS if v != "default"]  # the fused request: split
# longer sequences with the Gluon forward enabled up to its limit (gluon_fwd.long_fwd_kernel): case -> token grid
LONG_GLUON = {"d64_bf16_interleaved": (24, 24), "d64_bf16_perhead": (16, 25), "d64_fp16_interleaved": (20, 32)}
# the long kernel's attending partitions beside the table's three groups with early release (case, grid, groups,
# early release, swapped tail): one partition of two warpgroups at N = 577 and 401 (per-head table, an odd slice
# count); the swapped tail at 577 and 197 (three groups: one with a single slice per head, first and last at once;
# five rows swapped)
GLUON_GROUPS = [("d64_bf16_interleaved", (24, 24), 0, False, False), ("d64_bf16_perhead", (16, 25), 0, False, False),
                ("d64_bf16_interleaved", (24, 24), 3, True, True), ("d64_bf16_interleaved", (14, 14), 3, True, True)]
# past 640 tokens with the Gluon forwards enabled up to 1152 (gluon_fwd.stream_fwd_kernel): case -> (token grid,
# prefix tokens): ViT-B/16@512 with 4 register tokens (a 16-key tail, one group idle in the last round), ViT-L/16@448
# with a per-head table (a 32-key tail, two idle), the largest (18 whole boxes)
STREAM_GLUON = {"d64_bf16_interleaved": ((32, 32), 5), "d64_bf16_perhead": ((28, 28), 1),
                "d64_fp16_interleaved": ((32, 36), 0)}


def case_inputs(D, dtype, layout, table, n_kv, varlen=None, B=2, H=3, grid=(14, 14), P=1):
    """q, k, v [B, H, N, D] as views of one fused [B, N, 3, H, D] projection (k, v [B, H, n_kv, D] of their own
    for cross attention; [B, h_kv, N, D] with varlen's h_kv), the table (None without RoPE; from timm's sin/cos
    format when per head or per sample) and a key padding mask [B, N] (None unless varlen has mask)."""
    varlen = varlen or {}
    N = P + grid[0] * grid[1]
    q, k, v = torch.empty(B, N, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    if n_kv is not None or "h_kv" in varlen:
        k, v = (torch.empty(B, n_kv or N, varlen.get("h_kv", H), D, dtype=dtype).transpose(1, 2) for _ in "kv")
    mask = torch.ones(B, k.shape[2], dtype=torch.bool) if varlen.get("mask") else None
    if layout is None:
        return q, k, v, None, mask
    if table == "shared":
        return q, k, v, CosSinTable(grid=grid, head_dim=D, prefix_tokens=P, layout=layout), mask
    angles = torch.rand(*{"per_head": (H,), "per_sample": (B, 1)}[table], grid[0] * grid[1], D // 2)
    if layout == "interleaved":
        sin, cos = angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)
    else:
        sin, cos = torch.cat([angles.sin()] * 2, -1), torch.cat([angles.cos()] * 2, -1)
    return q, k, v, CosSinTable.from_sin_cos(torch.cat([sin, cos], -1), prefix_tokens=P, layout=layout), mask


# triton_rope_sdpa's rotation pass (it launches through the same runtime): name -> (D, dtype, layout, table kind,
# k/v heads); table kind: "shared" [N_grid, D/2], "per_head" [H, ...], "per_sample" [B, 1, ...], "coords" (angles
# computed in the kernel from coords [B, N_grid, 2] and per-head freqs [H, D/2, 2])
ROTATE_CASES = {
    "d64_bf16_interleaved": (64, torch.bfloat16, "interleaved", "shared", 3),
    "d64_bf16_half_per_head": (64, torch.bfloat16, "half", "per_head", 3),
    "d64_bf16_per_sample_gqa": (64, torch.bfloat16, "interleaved", "per_sample", 1),
    "d80_fp16_interleaved": (80, torch.float16, "interleaved", "shared", 3),  # pairs loaded with a stride
    "d128_fp32_half": (128, torch.float32, "half", "shared", 3),
    "d64_bf16_coords_gqa": (64, torch.bfloat16, "interleaved", "coords", 1),
}


def rotate_launches(D, dtype, layout, table, h_kv, B=2, H=3, grid=(14, 14), P=1) -> list[Launch]:
    """The launches of triton_rope_sdpa's forward rotation and its backward (R^T) pass, recorded, not run."""
    from attnhub.backends import triton_rope_sdpa as rope_sdpa

    q = torch.empty(B, grid[0] * grid[1] + P, 3, H, D, dtype=dtype).permute(2, 0, 3, 1, 4)[0]
    k = torch.empty(B, h_kv, grid[0] * grid[1] + P, D, dtype=dtype)
    n = grid[0] * grid[1]
    if table == "coords":
        cos, sin = torch.rand(B, n, 2), torch.rand(H, D // 2, 2)
    else:
        cos = sin = torch.rand({"shared": (), "per_head": (H,), "per_sample": (B, 1)}[table] + (n, D // 2))
    with runtime.recording(run=False) as launches:
        for inverse in (False, True):
            rope_sdpa._rotate(q, k, cos, sin, P, layout, inverse, coords=table == "coords")
    return launches


# the streaming kernel's jobs compile its own training form (rotating q and K, storing them), which Hopper's table
# replaces past 640 tokens by the rotation pass and the kernel without RoPE (`gluon_prerotate_train_from_n`)
OWN_TRAINING_FORM = dict(gluon_prerotate_train_from_n=None)


def matrix_jobs(rotate: bool = True) -> list[tuple[str, str, list[Launch]]]:
    """(case, variant, launches) of `MATRIX`, the Gluon forwards up to 640 tokens (inference, training, early
    release, attending groups), the Gluon backward with whole last blocks and, with `rotate`, triton_rope_sdpa's
    rotation."""
    jobs = [(case, variant, training_step_launches(*case_inputs(*CASES[case]), bwd=VARIANTS[variant][1],
                                                   **VARIANTS[variant][0])) for case, variant in MATRIX]
    jobs += [(f"{case}_n{1 + grid[0] * grid[1]}", "long_gluon",
              training_step_launches(*case_inputs(*CASES[case], grid=grid), resident_fwd_max_n=640))
             for case, grid in LONG_GLUON.items()]
    jobs += [(f"{case}_n{1 + grid[0] * grid[1]}", "gluon_train",  # training forwards through the Gluon kernels
              training_step_launches(*case_inputs(*CASES[case], grid=grid), resident_fwd_max_n=640,
                                     resident_train_max_n=640))
             for case, grid in {**LONG_GLUON, "d64_bf16_perhead": (14, 14)}.items()]
    jobs += [(f"{case}_n{1 + grid[0] * grid[1]}", "gluon_early_release",  # the long kernel's boxes handed back
              training_step_launches(*case_inputs(*CASES[case], grid=grid), resident_fwd_max_n=640,  # box by box
                                     resident_train_max_n=640, long_early_release=True, long_attend_groups=0))
             for case, grid in LONG_GLUON.items()]
    jobs += [(f"{case}_n{1 + grid[0] * grid[1]}", "gluon_long_from_128",  # the long kernel where the resident
              training_step_launches(*case_inputs(*CASES[case], grid=grid), resident_fwd_max_n=640,  # one serves
                                     resident_train_max_n=640, gluon_long_from_n=128, long_early_release=True))
             for case, grid in {"d64_bf16_interleaved": (14, 14), "d64_fp16_interleaved": (1, 127)}.items()]
    jobs += [(f"{case}_n{1 + grid[0] * grid[1]}",  # attending warpgroups as partitions
              f"gluon_{groups}_groups{'_early' if early else ''}{'_tail' if tail else ''}",
              training_step_launches(*case_inputs(*CASES[case], grid=grid), resident_fwd_max_n=640,
                                     resident_train_max_n=640, long_attend_groups=groups, long_early_release=early,
                                     long_swap_tail=tail, gluon_long_from_n=128))
             for case, grid, groups, early, tail in GLUON_GROUPS]
    jobs += [(f"{case}_n{P + grid[0] * grid[1]}", "stream_gluon",  # inference and training through it (the plain
              training_step_launches(*case_inputs(*CASES[case], grid=grid, P=P), resident_fwd_max_n=1152,  # loop)
                                     resident_train_max_n=1152, stream_overlap=False, **OWN_TRAINING_FORM))
             for case, (grid, P) in STREAM_GLUON.items()]
    jobs += [("d64_bf16_interleaved_n1029", "stream_gluon_5_slots",  # its deepest ring: the most shared memory
              training_step_launches(*case_inputs(*CASES["d64_bf16_interleaved"], grid=(32, 32), P=5),
                                     resident_fwd_max_n=1152, resident_train_max_n=1152, stream_v_slots=5,
                                     **OWN_TRAINING_FORM))]
    jobs += [("d64_bf16_norope_n1029", "stream_gluon_2_slots",  # no RoPE (no rotation), the shallowest ring
              training_step_launches(*case_inputs(64, torch.bfloat16, None, "shared", None, grid=(32, 32), P=5),
                                     resident_fwd_max_n=1152, resident_train_max_n=1152, stream_v_slots=2)),
             ("d64_bf16_perhead_n785", "stream_gluon_3_slots",
              training_step_launches(*case_inputs(*CASES["d64_bf16_perhead"], grid=(28, 28), P=1),
                                     resident_fwd_max_n=1152, resident_train_max_n=1152, stream_v_slots=3,
                                     **OWN_TRAINING_FORM))]
    jobs += [(f"{case}_n{P + grid[0] * grid[1]}", "stream_gluon_overlap",  # S of a box issued before P V of the last
              training_step_launches(*case_inputs(*CASES[case], grid=grid, P=P), resident_fwd_max_n=1152,
                                     resident_train_max_n=1152, stream_overlap=True, **OWN_TRAINING_FORM))
             for case, (grid, P) in STREAM_GLUON.items()]
    jobs += [("d64_bf16_interleaved_n1029", "stream_gluon_rotate_first",  # the table's training past 640 tokens:
              training_step_launches(*case_inputs(*CASES["d64_bf16_interleaved"], grid=(32, 32), P=5)))]  # the pass
    jobs += [(f"{case}_n{1 + grid[0] * grid[1]}", "gluon_resident_plain",  # the resident kernel without its
              training_step_launches(*case_inputs(*CASES[case], grid=grid),  # rotating warpgroup (the table's: with)
                                     resident_warp_specialized=False))
             for case, grid in (("d64_bf16_interleaved", (14, 14)), ("d64_bf16_perhead", (1, 99)))]
    jobs += [(f"{case}_n{1 + grid[0] * grid[1]}", "gluon_bwd_whole_tail",  # the Gluon backward, last blocks whole,
              training_step_launches(*case_inputs(*CASES[case], grid=grid), narrow_tail=False,  # the delta pass
                                     delta_in_dq=False))
             for case, grid in LONG_GLUON.items()]
    jobs += [(f"{case}_n{1 + grid[0] * grid[1]}", "gluon_bwd_unswapped",  # no last block swapped (the table's
              training_step_launches(*case_inputs(*CASES[case], grid=grid), bwd_swap_tail=False))  # at 577, 641)
             for case, grid in LONG_GLUON.items()]
    jobs += [(f"{case}_n{1 + grid[0] * grid[1]}", "gluon_bwd_unswapped_delta_pass",  # and with the delta pass
              training_step_launches(*case_inputs(*CASES[case], grid=grid), bwd_swap_tail=False, narrow_tail=False,
                                     delta_in_dq=False))
             for case, grid in LONG_GLUON.items()]
    if rotate:
        jobs += [(f"rope_sdpa_{case}", "rotate", rotate_launches(*spec)) for case, spec in ROTATE_CASES.items()]
    return jobs


def check_matrix(shard: int = 0, shards: int = 1) -> dict:
    """Compile the launches of `matrix_jobs` for sm_90, every `shards`-th from the `shard`-th (a process per shard
    uses every core) -> {"ok": bool, "rows": [...], "failures": [...]}."""
    rows, failures = [], []
    jobs = matrix_jobs()
    numbered = enumerate((case, variant, launch) for case, variant, launches in jobs for launch in launches)
    for case, variant, launch in (job for i, job in numbered if i % shards == shard):
        cx = launch.constexprs
        where = f"{case}/{variant} {launch.name} {cx.get('BLOCK_M')}x{cx.get('BLOCK_N')}"
        try:
            report = compile_launch(launch, ptxas=False)
        except Exception as exc:  # noqa: BLE001 - every compile error is a finding to report
            failures.append(f"{where}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        if report["shared_bytes"] > H100_SHARED_BYTES:
            failures.append(f"{where}: {report['shared_bytes']} bytes of shared memory > {H100_SHARED_BYTES}")
        rows.append(dict(case=case, variant=variant, kernel=launch.name, **report))
    # the checker checks itself: a launch with one argument too few must be refused
    launch = training_step_launches(*case_inputs(*CASES["d64_bf16_interleaved"]))[0]
    try:
        _specialize(launch._replace(args=launch.args[:-1]))
        failures.append("self-check: a launch with one argument too few was not refused")
    except TypeError:
        pass
    return dict(ok=not failures, triton=triton.__version__, rows=rows, failures=failures)


def ir(launch: Launch) -> list[str]:
    """The IR of one recorded launch for sm_90 as the frontend made it, without locations and with SSA names
    numbered in order of appearance (equal lists, equal programs): TTIR of a Triton kernel (before any GPU pass),
    TTGIR of a Gluon one (its frontend writes TTGIR; compared after the same passes)."""
    sig, consts, attrs = _specialize(launch)
    gluon = _is_gluon(launch.kernel)
    source = ASTSource
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as source
    options = {k: v for k, v in launch.constexprs.items() if k in OPTIONS}
    compiled = triton.compile(source(launch.kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages, **options))
    names: dict[str, str] = {}
    lines = (re.sub(r" loc\(.*$", "", line).strip() for line in compiled.asm["ttgir" if gluon else "ttir"].splitlines()
             if line.strip() and not line.startswith("#loc"))
    return [re.sub(r"%[\w.#]+", lambda m: names.setdefault(m.group(0), f"%v{len(names)}"), line) for line in lines]


# the modules holding every kernel, each after the ones it imports
KERNEL_FILES = ("kernels.py", "gluon_kernels.py", "gluon_long_kernels.py", "gluon_stream_kernels.py",
                "gluon_bwd_kernels.py")
_PACKAGE = "attnhub.backends.triton_fa_rope"


def load_kernel_files(folder: str) -> tuple[dict[str, object], set[str]]:
    """The kernel modules of another checkout, from `folder` (any of `KERNEL_FILES`; e.g. written by `git show
    REV:backends/triton_fa_rope/<file>`), each loaded as a module of its own, importing the folder's other kernel
    modules where it has them -> ({kernel name: kernel}, the files found)."""
    import importlib.util

    kernels: dict[str, object] = {}
    found = {name for name in KERNEL_FILES if os.path.exists(os.path.join(folder, name))}
    for name in (n for n in KERNEL_FILES if n in found):
        stem = f"_sm90_old_{name[:-3]}"
        with open(os.path.join(folder, name)) as fh:
            text = fh.read()
        for other in found:  # no module's dotted name is part of another's
            text = text.replace(f"{_PACKAGE}.{other[:-3]}", f"_sm90_old_{other[:-3]}")
        copy = os.path.join(folder, stem + ".py")
        with open(copy, "w") as fh:
            fh.write(text)
        spec = importlib.util.spec_from_file_location(stem, copy)
        module = importlib.util.module_from_spec(spec)
        sys.modules[stem] = module  # the next file may import it
        spec.loader.exec_module(module)
        kernels.update({k: v for k, v in vars(module).items() if hasattr(v, "params") and hasattr(v, "fn")})
    return kernels, found


def same_ir(folder: str, jobs=None, gluon: bool = True) -> dict:
    """Every launch of `jobs` (default `matrix_jobs` without triton_rope_sdpa's rotation) whose kernel's file is in
    `folder` (`load_kernel_files`; Gluon kernels only with `gluon`) compiled with this checkout's kernels and with
    the other's: a change that leaves every IR equal leaves the GPU's code as it was -> {"compared", "differ":
    [...], "new": [...]}. A launch with a constexpr the other kernel lacks is compared with that constexpr left out
    when it is off (False, 0, None: the other checkout's path); it is `new` when it is on (a path the other cannot
    run), as is a kernel the other files lack. A kernel is looked for by name in all of them (a kernel moved to
    another module is compared). A kernel that takes other arguments differs."""
    old, found = load_kernel_files(folder)
    compared, differ, new = 0, [], []
    for case, variant, launches in matrix_jobs(rotate=False) if jobs is None else jobs:
        for launch in launches:
            other = old.get(launch.kernel.fn.__name__)
            if (other is None and launch.kernel.fn.__module__.rpartition(".")[2] + ".py" not in found) or (
                    _is_gluon(launch.kernel) and not gluon):
                continue
            where = f"{case}/{variant} {launch.name}"
            extra = {} if other is None else {k: v for k, v in _constexprs(launch).items()
                                              if k not in {p.name for p in other.params}}
            if other is None or any(extra.values()):
                new.append(where)
                continue
            compared += 1
            try:
                same = ir(launch) == ir(launch._replace(kernel=other, constexprs={
                    k: v for k, v in launch.constexprs.items() if k not in extra}))
            except Exception as exc:  # noqa: BLE001 - other parameters in the other checkout
                same = False
                print(f"{where}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            if not same:
                differ.append(where)
    return dict(triton=triton.__version__, compared=compared, differ=differ, new=new)


def same_ttir(old_kernels_path: str, matrix=None) -> dict:
    """`same_ir` of the Triton launches of `matrix` (default `MATRIX`) against another kernels.py (e.g. `git show
    REV:backends/triton_fa_rope/kernels.py > old.py`) -> {"compared", "differ": [...]} (a kernel the other file
    lacks differs too)."""
    jobs = [(case, variant, training_step_launches(*case_inputs(*CASES[case]), bwd=VARIANTS[variant][1],
                                                   **VARIANTS[variant][0]))
            for case, variant in (MATRIX if matrix is None else matrix)]
    with tempfile.TemporaryDirectory() as folder:
        with open(old_kernels_path) as src, open(os.path.join(folder, "kernels.py"), "w") as dst:
            dst.write(src.read())
        result = same_ir(folder, jobs, gluon=False)
    return dict(triton=result["triton"], compared=result["compared"], differ=result["differ"] + result["new"])


def same_as_revision(rev: str) -> dict:
    """`same_ir` against the kernel files of git revision `rev` of this repository."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with tempfile.TemporaryDirectory() as folder:
        for name in KERNEL_FILES:
            shown = subprocess.run(["git", "show", f"{rev}:backends/triton_fa_rope/{name}"], cwd=root,
                                   capture_output=True, text=True)
            if shown.returncode == 0:
                with open(os.path.join(folder, name), "w") as fh:
                    fh.write(shown.stdout)
        return dict(rev=rev, **same_ir(folder))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--matrix", action="store_true", help="compile every launch of MATRIX; exit 1 on a failure")
    ap.add_argument("--shard", default="0/1", metavar="I/N", help="with --matrix: every N-th launch from the I-th")
    ap.add_argument("--same-ttir", metavar="OLD_KERNELS_PY",
                    help="compare every Triton launch of MATRIX with another kernels.py's; exit 1 where one differs")
    ap.add_argument("--same-ir", metavar="REV",
                    help="compare every Triton and Gluon launch of the matrix with the kernels of git revision REV; "
                         "exit 1 where one differs")
    args = ap.parse_args()
    if configs.INTERPRET:
        raise SystemExit("sm90: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    if args.matrix:
        shard, shards = (int(x) for x in args.shard.split("/"))
        result = check_matrix(shard, shards)
        print(json.dumps(result, indent=1))
        return 0 if result["ok"] else 1
    if args.same_ttir or args.same_ir:
        result = same_ttir(args.same_ttir) if args.same_ttir else same_as_revision(args.same_ir)
        print(json.dumps(result, indent=1))
        return 0 if not result["differ"] else 1
    B, H, g, P, D = 256, 6, 14, 1, 64  # ViT-S/16 @ 224, q, k, v views of one fused qkv projection
    N = P + g * g
    q, k, v = torch.empty(B, N, 3, H, D, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4).unbind(0)
    rope = CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P)
    variants = {"in kernel": dict(**NEVER, narrow_tail=False),
                "in kernel, narrow tail": dict(**NEVER, narrow_tail=True),
                "prerotate": dict(**ALWAYS, narrow_tail=False),
                "prerotate, narrow tail": dict(**ALWAYS, narrow_tail=True)}
    rows = []
    for variant, config in variants.items():
        for step, launch in enumerate(training_step_launches(q, k, v, rope, **config)):
            if variant != "in kernel" and launch.name.startswith("bwd"):
                continue  # the backward does not depend on the forward variant
            report = compile_launch(launch)
            cfg = (launch.constexprs.get("BLOCK_M"), launch.constexprs.get("BLOCK_N"), launch.num_warps,
                   launch.num_stages)
            rows.append(dict(variant=variant, step=step, kernel=launch.name, cfg=cfg, **report))
            print(f"{variant:<24} {launch.name:<18} cfg {cfg}: " + " ".join(f"{k} {v}" for k, v in report.items()))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, target="cuda sm_90, compiled offline",
                           shape=dict(B=B, H=H, N=N, D=D, P=P, dtype="bfloat16", layout="interleaved"),
                           note="steps: 0 inference forward (1 with prerotate), then training forward, backward",
                           rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
