"""Launch configs of the triton_fa_rope kernels: one table per GPU architecture, without importing Triton.

`KernelConfig` is one kernel's (block_m, block_n, num_warps, num_stages[, maxnreg]); `ArchConfigs` holds every
kernel's config for head dims up to its `max_head_dim`, and the forward's variants. `for_call(device, head_dim)`
picks the table a call runs with; `override(**fields)` replaces fields of whatever it picks, for sweeps and tests.
Fixed configs, no run-time autotuning: the first call of a new shape costs one compilation per kernel. How the
Hopper tables were measured: benchmarks/README.md.

`LIMITS` is what the tables cover, in the registry's vocabulary; `registry.yaml` names it (`limits:`), so an entry
that allows more is a `RegistryError` when the registry loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Iterator, NamedTuple

import torch


LONG_ATTEND_GROUPS = (0, 3)  # `long_attend_groups`: one partition of two warpgroups attends, or three warpgroups
STREAM_V_SLOTS = (2, 3, 4, 5)  # `stream_v_slots`: V boxes in the streaming Gluon forward's ring


class GluonOptions(NamedTuple):
    """The switches of the Gluon forwards (`gluon_fwd`), as `ArchConfigs.gluon_options` gathers them from its
    fields: early_release (`long_early_release`), from_n (`gluon_long_from_n`), attend_groups
    (`long_attend_groups`), swap_tail (`long_swap_tail`) of the long kernel; v_slots (`stream_v_slots`) and
    overlap (`stream_overlap`) of the streaming one; resident_ws (`resident_warp_specialized`) of the resident one."""

    early_release: bool = False
    from_n: int = 257
    attend_groups: int = 0
    swap_tail: bool = False
    v_slots: int = 4
    overlap: bool = False
    resident_ws: bool = False


class KernelConfig(NamedTuple):
    """One kernel's launch: rows of queries and keys per tile, warps, software-pipeline stages, and a cap on the
    registers per thread (Triton's `maxnreg` launch option; None: the compiler's choice)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None

    def options(self) -> dict:
        """The launch options beyond warps and stages, as `kernel[grid](...)` takes them."""
        return {} if self.maxnreg is None else {"maxnreg": self.maxnreg}


@dataclasses.dataclass(frozen=True)
class ArchConfigs:
    """Every kernel's config for head dims up to `max_head_dim` on one architecture.

    fwd: inference forward; fwd_train: the training forward (it also writes the rotated q and k);
    fwd_prerotated, fwd_train_prerotated: the inference and training forwards after the rotation pass (None: fwd,
    fwd_train); dkdv, dq: the split
    backward's kernels; bwd_fused: the fused backward, taken automatically while max(N_Q, N_KV) <= bwd_fused_max_n.
    prerotate_from_n, prerotate_train_from_n: from this K/V length on (None: never), inference rotates K, training
    q and K, in a separate pass (`rotate_kernel`) so the attention kernel's K tiles feed the tensor cores without a
    rotation per query block; prerotate_q_from_n: from this length on (None: never) inference's pass rotates q too,
    so the attention kernel runs without RoPE (as training's does). narrow_tail: the last, partial K tile only as
    wide as the remainder needs.
    resident_fwd_max_n: inference calls up to this length (0: none) take the Gluon forward of `gluon_fwd` where it
    applies (`gluon_fwd.eligible`; past 640 tokens, up to `gluon_fwd.STREAM_MAX_N`, its streaming kernel);
    resident_train_max_n: training calls up to this length (and resident_fwd_max_n; 0: none) take it too, writing the
    rotated q and k for the backward. gluon_prerotate_train_from_n: from this K/V length on (None: never) a training
    call the Gluon forward takes has q and K rotated by `rotate_kernel` first, and the forward runs on them without
    RoPE, saving nothing (the rotation pass's q and k are what the backward reads).
    long_early_release: its long kernel (256 < N <= 640) hands each K/V box back in a head's last slice as soon as it
    is done with it, so the next head's boxes load and rotate during that slice.
    gluon_long_from_n: the Gluon forwards take the long kernel from this length on (past 256 tokens always, from 128
    at the earliest), the resident one below.
    long_attend_groups: 0, the long kernel's two attending warpgroups work as one partition on 128-row query
    slices; 3 (with long_early_release), three warpgroups attend as partitions of their own, 64-row slices in turn;
    long_swap_tail: with groups, a last query slice of at most 16 rows (N = 577: one) is computed with the keys as
    the MMA's rows (slower on the H200: off). stream_v_slots: V boxes in the ring of the streaming Gluon forward
    (past 640 tokens; fewer where K's boxes leave no room for them, `gluon_fwd.stream_v_slots`); stream_overlap:
    its groups issue a key box's S = Q K^T before the last box's P V and run that softmax while P V computes (FA3's
    intra-warpgroup overlap). resident_warp_specialized: up to 256 tokens the resident Gluon forward's
    warp-specialized form, a warpgroup loading and rotating the next head while the others attend this one.
    gluon_dkdv, gluon_dq: the Gluon backward kernels' configs (None: Triton's kernel), dK/dV: (queries per step,
    keys per program = 16 * num_warps, num_warps, query buffers[, maxnreg]), dQ: (queries per program = 16 *
    num_warps, keys per step, num_warps, K/V buffers[, maxnreg]); gluon_bwd_from_n: from this length on (None:
    never) the split backward runs them where they apply (`gluon_bwd.takes`); delta_in_dq: the Gluon dQ kernel
    computes delta (rowsum(o * dO)) of its queries and runs first, instead of the delta pass. bwd_swap_tail: a
    head's last resident block of 64 keys (dK/dV) or queries (dQ) holding at most 16 valid ones runs swapped, the
    streamed side as the MMA's rows and 16 columns for its few (`gluon_bwd.swap_rows`).
    """

    max_head_dim: int
    fwd: KernelConfig
    fwd_train: KernelConfig
    dkdv: KernelConfig
    dq: KernelConfig
    bwd_fused: KernelConfig
    fwd_prerotated: KernelConfig | None = None
    fwd_train_prerotated: KernelConfig | None = None
    bwd_fused_max_n: int = 0
    prerotate_from_n: int | None = None
    prerotate_train_from_n: int | None = None
    prerotate_q_from_n: int | None = None
    narrow_tail: bool = False
    resident_fwd_max_n: int = 0
    resident_train_max_n: int = 0
    gluon_prerotate_train_from_n: int | None = None
    long_early_release: bool = False
    gluon_long_from_n: int = 257
    long_attend_groups: int = 0
    long_swap_tail: bool = False
    stream_v_slots: int = 4
    stream_overlap: bool = False
    gluon_dkdv: KernelConfig | None = None
    gluon_dq: KernelConfig | None = None
    gluon_bwd_from_n: int | None = None
    delta_in_dq: bool = False
    bwd_swap_tail: bool = False
    resident_warp_specialized: bool = False

    def __post_init__(self):
        # checked once per table (and per `override`), not per call: the long kernel's static_assert refuses the same
        if self.long_attend_groups not in LONG_ATTEND_GROUPS:
            raise ValueError(f"triton_fa_rope: long_attend_groups={self.long_attend_groups!r}; the long Gluon forward "
                             f"has {LONG_ATTEND_GROUPS} (0: one partition of two warpgroups attends)")
        if self.long_attend_groups and not self.long_early_release:
            raise ValueError(f"triton_fa_rope: long_attend_groups={self.long_attend_groups} needs "
                             "long_early_release=True (the attending groups hand the K/V boxes back box by box)")
        if self.stream_v_slots not in STREAM_V_SLOTS:
            raise ValueError(f"triton_fa_rope: stream_v_slots={self.stream_v_slots!r}; the streaming Gluon forward's "
                             f"V ring takes {STREAM_V_SLOTS} boxes")
        for name in ("stream_overlap", "resident_warp_specialized"):  # a truthy string would pass as True
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"triton_fa_rope: {name}={getattr(self, name)!r}; True or False")

    @functools.cached_property
    def gluon_options(self) -> GluonOptions:
        """The Gluon forwards' switches (built once per table)."""
        return GluonOptions(self.long_early_release, self.gluon_long_from_n, self.long_attend_groups,
                            self.long_swap_tail, self.stream_v_slots, self.stream_overlap,
                            self.resident_warp_specialized)


K = KernelConfig
# Hopper (H100/H200), swept on an H100 for D <= 64 (the short backward on an H200); larger D not yet swept. The
# fused backward with every query in one block (N <= 256) beats the split one by 4-5% of GPU time at N = 197 and
# saves two launches; with several query blocks it is slower, so only up to 256 tokens. Inference up to 640 tokens
# takes the Gluon forwards (K and V resident, rotated once per head): 1.2-1.3x the Triton one's speed at N = 197,
# 1.13x at N = 257. Training takes them too (1.6x the Triton training forward at N = 197 and 257). From 257 tokens
# the long kernel's three attending warpgroups with early release: 1.24x its one-partition form at N = 577 (1.18x
# as the training forward, which then beats the Triton one with its rotation pass), 1.30x at 401 (H200:
# benchmarks/README.md). Past 640 tokens, up to 1152, the streaming Gluon forward (K resident, V through a ring of
# four, the overlapped key loop): 1.20x the Triton forward at N = 785 and 1029, 1.07-1.08x as the training forward
# (H100; the ring's depth moved it by 1-3%).
# dq at 128 registers keeps two 8-warp CTAs per SM with a key padding mask too (180 registers uncapped);
# fwd_train_prerotated, dkdv and dq re-swept on the H200 at N = 577 / 1029 and the NaFlex case, fwd_prerotated at
# N = 785 / 1029 (1.15x the fwd config there); inference's rotation pass takes q too past the Gluon forwards' 640
# tokens (3.5-3.8% at N = 785 / 1029 once q and k share one launch; not measured with key padding, which the Triton
# forward serves from 384 tokens). From 257 tokens the
# split backward runs the Gluon dK/dV and dQ kernels (capped registers: three and four CTAs per SM); below, the
# fused backward's one launch wins where the host bounds the step (a compiled ViT-S), so it stays there. A head's
# last block of at most 16 rows runs swapped there (bwd_swap_tail): its dK/dV and dQ kernels 1.02-1.06x faster at
# N = 577 and 1029, fwd+bwd 1.01-1.02x (GPU time, H100). Past 640 tokens training rotates q and k in a pass and runs
# the streaming kernel without RoPE: its training form, which rotates and stores them itself, costs more than the
# pass (at 577 the long kernel's does not: benchmarks/README.md). Up to 256 tokens the resident kernel is
# warp-specialized (a warpgroup loads and rotates the next head while the others attend): 1.07-1.12x its plain form
# for inference, 1.09-1.15x for training at N = 197 (H100).
HOPPER = (
    ArchConfigs(64, fwd=K(128, 64, 4, 3), fwd_train=K(256, 64, 8, 3), fwd_prerotated=K(64, 64, 4, 3),
                fwd_train_prerotated=K(64, 64, 4, 3),
                dkdv=K(32, 128, 4, 3), dq=K(128, 64, 8, 3, 128), bwd_fused=K(256, 64, 8, 1), bwd_fused_max_n=256,
                prerotate_from_n=384, prerotate_train_from_n=384, prerotate_q_from_n=641, narrow_tail=True,
                resident_fwd_max_n=1152, resident_train_max_n=1152, gluon_prerotate_train_from_n=641,
                long_early_release=True, long_attend_groups=3,
                stream_overlap=True,
                gluon_dkdv=K(64, 64, 4, 2, 168), gluon_dq=K(64, 64, 4, 2, 168), gluon_bwd_from_n=257, delta_in_dq=True,
                bwd_swap_tail=True, resident_warp_specialized=True),
    ArchConfigs(128, fwd=K(128, 64, 8, 2), fwd_train=K(128, 64, 8, 2), dkdv=K(32, 64, 4, 2), dq=K(64, 64, 4, 2),
                bwd_fused=K(64, 64, 8, 2)),
    ArchConfigs(256, fwd=K(64, 32, 8, 2), fwd_train=K(64, 32, 8, 2), dkdv=K(32, 32, 8, 1), dq=K(32, 32, 8, 1),
                bwd_fused=K(32, 32, 8, 1)),
)
# Other GPUs: not swept.
OTHER = (
    ArchConfigs(64, fwd=K(64, 64, 4, 2), fwd_train=K(64, 64, 4, 2), dkdv=K(64, 64, 4, 2), dq=K(64, 64, 4, 2),
                bwd_fused=K(64, 64, 4, 2)),
    ArchConfigs(128, fwd=K(64, 64, 4, 2), fwd_train=K(64, 64, 4, 2), dkdv=K(64, 32, 4, 2), dq=K(64, 32, 4, 2),
                bwd_fused=K(64, 32, 4, 2)),
    ArchConfigs(256, fwd=K(64, 32, 8, 1), fwd_train=K(64, 32, 8, 1), dkdv=K(32, 32, 8, 1), dq=K(32, 32, 8, 1),
                bwd_fused=K(32, 32, 8, 1)),
)
# The CPU interpreter: small blocks keep it fast; one warp, one stage (it simulates neither).
INTERPRETER = (
    ArchConfigs(256, fwd=K(32, 32, 1, 1), fwd_train=K(32, 32, 1, 1), fwd_train_prerotated=K(32, 32, 1, 1),
                dkdv=K(32, 32, 1, 1), dq=K(32, 32, 1, 1), bwd_fused=K(32, 32, 1, 1)),
)
TABLES: dict[int, tuple[ArchConfigs, ...]] = {9: HOPPER}  # compute capability major -> table; others: OTHER
del K

# What every table covers, for the registry's check at load (registry.yaml: `limits:`).
LIMITS = {"head_dim": {"max": min(table[-1].max_head_dim for table in (*TABLES.values(), OTHER, INTERPRETER))}}

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, as Triton does
_OVERRIDES: dict[str, Any] = {}
_REPLACED: dict[int, ArchConfigs] = {}  # id of base configs -> them with _OVERRIDES applied (emptied as those change)


def for_arch(major: int | None, head_dim: int) -> ArchConfigs:
    """The configs of compute capability `major` (None: the interpreter's) for head dim `head_dim`."""
    table = INTERPRETER if major is None else TABLES.get(major, OTHER)
    for configs in table:
        if head_dim <= configs.max_head_dim:
            return configs
    raise ValueError(f"triton_fa_rope: head_dim {head_dim} > {table[-1].max_head_dim}, the largest its configs "
                     "cover (the registry entry should not allow it)")


@functools.lru_cache(maxsize=None)
def _for_device(device: torch.device, head_dim: int) -> ArchConfigs:
    if INTERPRET or device.type != "cuda":
        return for_arch(None, head_dim)
    return for_arch(torch.cuda.get_device_capability(device)[0], head_dim)


def for_call(device: torch.device, head_dim: int) -> ArchConfigs:
    """The configs a call on `device` with head dim `head_dim` runs with, fields of `override` applied (one object
    per base configs within an `override` block, so plans keyed by a config's identity hold there too)."""
    configs = _for_device(device, head_dim)
    if not _OVERRIDES:
        return configs
    hit = _REPLACED.get(id(configs))  # the base configs are kept by _for_device's cache: their ids stay theirs
    if hit is None:
        hit = _REPLACED[id(configs)] = dataclasses.replace(configs, **_OVERRIDES)
    return hit


@contextlib.contextmanager
def override(**fields: Any) -> Iterator[None]:
    """Within the block, `for_call` returns its configs with these fields replaced (process-wide; nests), e.g.
    `override(prerotate_from_n=0, narrow_tail=True)` or `override(fwd=KernelConfig(64, 32, 4, 2))`."""
    known = {f.name for f in dataclasses.fields(ArchConfigs)} - {"max_head_dim"}
    unknown = set(fields) - known
    if unknown:
        raise TypeError(f"configs.override: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(fields)
    _REPLACED.clear()
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)
        _REPLACED.clear()
