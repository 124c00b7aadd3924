"""Selection over the registry: filter backends by their constraints, pick the highest priority, cache, explain.

`Call` is the decision key: everything about a call that can change which backend runs (and nothing else, so a
cached decision is a dict lookup), the forced or pinned backend and the disabled ones included (attnhub.control).
The checks below are generic over the vocabulary of `registry.yaml`. `run` adds the fallback of automatic
selection: a backend that fails at the first run of its decision is ruled out for that key and the next one runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import threading
from typing import Callable, NamedTuple

import torch

from attnhub import _measured, _tuning
from attnhub.registry import REGISTRY, Spec
from attnhub.rope import CosSinTable

log = logging.getLogger(__name__)

CACHE_SIZE = 4096  # distinct decision keys kept; a model sees a handful, so this only bounds pathological use


class UnknownBackendError(ValueError):
    """A backend name that is not registered."""


class BackendUnavailableError(RuntimeError):
    """A forced, pinned or disabled backend that cannot run this call, or a call no backend can run (every one
    rejected, disabled or failed); the message lists why."""


class Call(NamedTuple):
    """The decision key of one `attnhub.attention` call. Build it with `Call.from_inputs`, the one place that turns
    a call into its key (for the API, the compiled path, `explain` and tuning alike)."""

    device_type: str
    device_index: int | None
    dtype: torch.dtype
    batch: int  # 0 in a compiled graph (see `from_inputs`)
    heads: int  # 0 in a compiled graph
    n_q: int
    n_kv: int
    head_dim: int
    rope_layout: str  # "none", "interleaved" or "half"
    rope_per_head: bool
    rope_grad: bool  # the table requires grad and grad mode is on
    needs_grad: bool  # q, k or v requires grad and grad mode is on
    key_padding: bool  # a key_padding_mask is given
    gqa: bool  # k/v have fewer heads than q (grouped k/v heads)
    rope_batched: bool  # one RoPE table per sample ([B, 1|H, N_grid, D/2])
    rope_coords: bool  # a RoPE table built from coordinates and frequencies (CosSinTable.from_coords)
    forced: str | None
    forced_by: str | None  # "pinned on blocks.0.attn", "forced by ATTNHUB_BACKEND", ... (see attnhub.control)
    disabled: tuple[tuple[str, str], ...]  # sorted (backend, who disabled it): ATTNHUB_DISABLE, disable_backends
    registry_version: int

    @classmethod
    def from_inputs(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: CosSinTable | None,
        control: tuple[str | None, str | None, tuple[tuple[str, str], ...]] | None = None,
        key_padding_mask: torch.Tensor | None = None,
        *,
        static: bool = False,
    ) -> Call:
        """The key of `attention(q, k, v, rope, key_padding_mask=...)` in the current grad mode, under `control`:
        (forced backend or None for automatic, who forced it, disabled backends), from `attnhub.control.resolve`;
        None: automatic, nothing disabled.

        q: [B, H, N, D]; k, v: [B, H_kv, N_kv, D], validated and already in the dtype the backend computes in (the
        autocast dtype under autocast). `static`: only the facts a compiled graph fixes; batch and heads read as 0
        so a dynamic batch size never enters the key (the caller sets the control and `registry_version` at trace
        time).
        """
        grad = torch.is_grad_enabled()
        B, H, N, D = q.shape
        return cls(
            q.device.type,
            q.device.index,
            q.dtype,
            0 if static else B,
            0 if static else H,
            N,
            k.shape[2],
            D,
            "none" if rope is None else rope.layout,
            rope is not None and rope.per_head,
            grad and rope is not None and rope.requires_grad,
            grad and (q.requires_grad or k.requires_grad or v.requires_grad),
            key_padding_mask is not None,
            k.shape[1] != H,
            rope is not None and rope.batched,
            rope is not None and rope.coords is not None,
            *(control or (None, None, ())),
            0 if static else REGISTRY.version,
        )

    def facts(self) -> dict[str, object]:
        """The facts of the call as JSON values, without the selection context (forced and disabled backends,
        registry version): what a measured choice is recorded under in tune.json."""
        fields = self._asdict()
        del fields["forced"], fields["forced_by"], fields["disabled"], fields["registry_version"]
        for name in ("key_padding", "gqa", "rope_batched", "rope_coords"):  # absent when false: the keys of
            if not fields[name]:  # calls without them stay what they were before these facts existed
                del fields[name]
        fields["dtype"] = str(self.dtype)
        return fields


def fast_key(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: CosSinTable | None, control: tuple,
    scale: float | None, autocast: bool, key_padding_mask: torch.Tensor | None = None,
) -> tuple:
    """The key of `FAST`: the raw facts that validation and `Call.from_inputs` read, in a tuple that is cheaper to
    build and hash than a `Call` (the API builds it on every call). `control`: `attnhub.control.state`, what the
    forced and disabled backends are resolved from. A hit skips validation and selection, which are functions of
    these facts. Raises AttributeError or TypeError when q, k, v are not tensors or `rope` is not a table (the
    caller then validates, which names the argument).
    """
    grad, mask = torch.is_grad_enabled(), key_padding_mask
    return (
        q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
        None if rope is None else (type(rope), rope.signature, grad and rope.requires_grad),
        None if mask is None else (type(mask), mask.shape, mask.dtype, mask.device),
        grad and (q.requires_grad or k.requires_grad or v.requires_grad), control, type(scale),
        autocast and torch.get_autocast_dtype(q.device.type), REGISTRY.version, _tuning.enabled(),
    )


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Why a backend was chosen for a call, and why every other one was not. `print()` it."""

    chosen: str | None
    reasons: dict[str, list[str]]  # backend -> reasons it cannot run this call (empty: it can)
    forced: str | None
    how: str  # "forced", "pinned", "priority", "measured" (tuned on this machine) or "table" (the shipped
    #           measured winners)
    detail: str = ""  # for "table": what was measured
    by: str | None = None  # for "forced" and "pinned": who, e.g. "pinned on blocks.0.attn"
    fell_back_from: tuple[str, ...] = ()  # backends that failed at their first run for this call

    def __str__(self) -> str:
        lines = []
        if self.chosen is None:
            lines.append("no backend can run this call")
        else:
            how = {"priority": "highest priority", "measured": "fastest when measured",
                   "table": "fastest in attnhub's measured winners"}.get(self.how, self.by or self.how)
            if self.fell_back_from:
                how += f"; fallback: {', '.join(self.fell_back_from)} failed at run time"
            lines.append(f"chosen: {self.chosen} ({how})")
            if self.detail:
                lines.append(f"  measured: {self.detail}")
        for name, why in self.reasons.items():
            if name == self.chosen:
                continue
            if not why:
                lines.append(f"  {name}: eligible, not chosen")
            else:
                lines.append(f"  {name}: rejected: " + "; ".join(why))
        return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> float:
    major, minor = torch.cuda.get_device_capability(device_index)
    return major + minor / 10


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _names(items) -> str:
    return "[" + ", ".join(str(i).replace("torch.", "") for i in items) + "]"


def device_reasons(spec: Spec, device_type: str, device_index: int | None, *, forced: bool) -> list[str]:
    """Why `spec` cannot run on this device whatever the inputs: a missing module, the device, its capability."""
    out = [f"needs Python module {m!r}" for m in spec.requires if not _importable(m)]
    if spec.devices is not None and device_type not in spec.devices:
        cc = f" (compute capability >= {spec.min_compute_capability})" if spec.min_compute_capability else ""
        needs = f"device {device_type}: needs {_names(spec.devices)}{cc}"
        if device_type not in spec.interpreter_devices:
            out.append(needs)
        elif not forced:
            out.append(f"{needs}; runs on {device_type} only when forced, through the Triton interpreter")
        elif not _interpreting():
            out.append(f"{needs}; on {device_type} set TRITON_INTERPRET=1 before importing attnhub")
    elif device_type == "cuda" and spec.min_compute_capability is not None:
        capability = _capability(device_index or 0)
        if capability < spec.min_compute_capability:
            out.append(f"compute capability {capability}: needs >= {spec.min_compute_capability}")
    return out


def reasons(spec: Spec, call: Call, *, forced: bool) -> list[str]:
    """Why `spec` cannot run `call` (an empty list: it can). Generic over the registry vocabulary."""
    out = device_reasons(spec, call.device_type, call.device_index, forced=forced)
    if spec.dtypes is not None and call.dtype not in spec.dtypes:
        out.append(f"dtype {_names([call.dtype])[1:-1]} not in {_names(spec.dtypes)}")
    hd = spec.head_dim
    if "multiple_of" in hd and call.head_dim % hd["multiple_of"]:
        out.append(f"head_dim {call.head_dim} is not a multiple of {hd['multiple_of']}")
    if "min" in hd and call.head_dim < hd["min"]:
        out.append(f"head_dim {call.head_dim} < {hd['min']}")
    if "max" in hd and call.head_dim > hd["max"]:
        out.append(f"head_dim {call.head_dim} > {hd['max']}")
    if spec.max_seq_len is not None and max(call.n_q, call.n_kv) > spec.max_seq_len:
        out.append(f"sequence length {max(call.n_q, call.n_kv)} > {spec.max_seq_len}")
    if call.n_q != call.n_kv and not spec.cross_attention:
        out.append(f"cross-attention (N_q={call.n_q} != N_kv={call.n_kv}) not supported")
    if call.rope_layout not in spec.rope_layouts:
        out.append(f"RoPE layout {call.rope_layout!r} not in {_names(spec.rope_layouts)}")
    out += [why for need, can, why in _FEATURES if getattr(call, need) and not getattr(spec, can)]
    return out


# (fact of the call, registry field that admits it, the reason when it does not)
_FEATURES = (
    ("rope_per_head", "rope_per_head", "per-head RoPE tables not supported"),
    ("rope_batched", "rope_batched", "per-sample RoPE tables ([B, 1|H, N_grid, D/2]) not supported"),
    ("rope_coords", "rope_coords", "RoPE tables from coordinates (CosSinTable.from_coords) not supported"),
    ("key_padding", "key_padding", "no key_padding_mask support"),
    ("gqa", "gqa", "grouped k/v heads (H_kv < H) not supported"),
    ("rope_grad", "rope_grad", "no gradient w.r.t. the RoPE table (the table requires grad)"),
    ("needs_grad", "backward", "no backward (inputs require grad)"),
)


def _decide(call: Call, measure: Callable[[list[str]], str] | None = None) -> Explanation:
    """The choice for `call`: the forced (or pinned) backend, which must be able to run it, else the best eligible
    one once the disabled ones and the ones that failed at run time for this key are ruled out."""
    specs = REGISTRY.specs()
    disabled = dict(call.disabled)
    for name, by in call.disabled:
        if name not in specs:
            raise UnknownBackendError(f"{by}: unknown attnhub backend {name!r}; known: {sorted(specs)}")
    if call.forced is not None and call.forced not in specs:
        raise UnknownBackendError(f"unknown attnhub backend {call.forced!r} ({call.forced_by}); known: {sorted(specs)}")
    why = {name: reasons(spec, call, forced=name == call.forced) for name, spec in specs.items()}
    if call.forced is not None:
        how = "pinned" if call.forced_by and call.forced_by.startswith("pinned") else "forced"
        what = f"attnhub backend {call.forced!r} " + (f"is {call.forced_by}" if how == "pinned" else "was forced")
        if call.forced in disabled:
            raise BackendUnavailableError(
                f"{what} but is disabled by {disabled[call.forced]} ({call.forced_by}); lift one of the two")
        if why[call.forced]:
            raise BackendUnavailableError(
                f"{what} but cannot run this call: " + "; ".join(why[call.forced])
                + f". Eligible here: {sorted(n for n, w in why.items() if not w) or 'none'} ({call.forced_by})"
            )
        return Explanation(call.forced, why, call.forced, how, by=call.forced_by)
    for name, by in disabled.items():
        why[name].append(f"disabled by {by}")
    failed = _failed.get(call, {})
    for name, error in failed.items():
        if name in why:
            why[name].append(f"failed at its first run for this call, skipped in this process: {error}")
    eligible = sorted((n for n, w in why.items() if not w), key=lambda n: (-specs[n].priority, n))
    measured = _tuning.lookup(call, eligible)
    if measured is None and measure is not None and len(eligible) > 1:
        measured = measure(eligible)
    fell_back = tuple(n for n in failed if n in why)
    if measured is not None:
        return Explanation(measured, why, None, "measured", fell_back_from=fell_back)
    row = _measured.lookup(call, eligible)
    if row is not None:
        return Explanation(row.backend, why, None, "table", row.measured, fell_back_from=fell_back)
    return Explanation(eligible[0] if eligible else None, why, None, "priority", fell_back_from=fell_back)


_cache: dict[Call, tuple[str, Callable]] = {}
_cache_lock = threading.Lock()


def choose(call: Call, measure: Callable[[list[str]], str] | None = None) -> tuple[str, Callable]:
    """The backend name and entry function for `call`; microseconds once cached.

    `measure(eligible_names) -> fastest` is called on a cache miss when given (selection by measurement).
    """
    hit = _cache.get(call)
    if hit is not None:
        return hit
    decision = _decide(call, measure)
    if decision.chosen is None:
        # backends whose one reason is the deny-list: without it they would run
        only_disabled = [f"{n} (by {by})" for n, by in call.disabled
                         if decision.reasons.get(n) == [f"disabled by {by}"]]
        if only_disabled and not decision.fell_back_from:
            raise BackendUnavailableError(
                f"every attnhub backend that can run this call is disabled: {', '.join(only_disabled)}; enable one\n"
                + str(decision))
        raise BackendUnavailableError("no attnhub backend can run this call:\n" + str(decision))
    hit = (decision.chosen, REGISTRY.entry(decision.chosen))
    with _cache_lock:
        if len(_cache) >= CACHE_SIZE:
            _cache.pop(next(iter(_cache)))  # oldest first: dicts keep insertion order
        _cache[call] = hit
    return hit


def run(call: Call, run_entry: Callable[[Callable], torch.Tensor],
        measure: Callable[[list[str]], str] | None = None) -> tuple[Callable, torch.Tensor]:
    """(entry, run_entry(entry)) for the backend chosen for `call`, with the fallback of automatic selection.

    The first run of an automatic decision (`call.forced` is None) is guarded: a backend that raises there (a
    compilation or launch failure; the inputs were validated before) is logged, marked failed for `call` in this
    process, and the next eligible backend runs on the same inputs. Out-of-memory errors propagate, and so does
    every error of a forced or pinned backend and of a decision that has run once.
    """
    while True:
        name, fn = choose(call, measure)
        if call.forced is not None or call in _ran:
            return fn, run_entry(fn)
        try:
            out = run_entry(fn)
        except (torch.OutOfMemoryError, MemoryError):
            raise
        except Exception as exc:
            log.warning("attnhub: backend %r failed at its first run for %s: %s: %s; it is skipped for this call "
                        "in this process, trying the next eligible backend", name, call, type(exc).__name__, exc)
            with _cache_lock:
                _failed.setdefault(call, {})[name] = f"{type(exc).__name__}: {exc}"
                _cache.pop(call, None)
            try:
                choose(call)
            except BackendUnavailableError as none_left:
                raise none_left from exc
            continue
        with _cache_lock:
            if len(_ran) >= CACHE_SIZE:
                _ran.pop(next(iter(_ran)))
            _ran[call] = None
        return fn, out


_ran: dict[Call, None] = {}  # automatic decisions whose backend completed a run: no fallback for them any more
_failed: dict[Call, dict[str, str]] = {}  # call -> {backend: its error at its first run}, for the process


# The API's fast path: `fast_key(...)` -> (entry function, the default scale D ** -0.5, whether the entry takes
# the keyword qkv), all functions of the key (the registry version is in it).
FAST: dict[tuple, tuple[Callable, float, bool]] = {}


def remember_fast(key: tuple, fn: Callable, default_scale: float) -> None:
    hit = (fn, default_scale, REGISTRY.takes_qkv(fn))
    with _cache_lock:
        if len(FAST) >= CACHE_SIZE:
            FAST.pop(next(iter(FAST)))
        FAST[key] = hit


def explain(call: Call) -> Explanation:
    return _decide(call)


def clear_cache() -> None:
    """Forget every decision (not the backends that failed at run time: those stay ruled out for their call) and
    the measured-winners file read for them (ATTNHUB_MEASURED or the file may have changed)."""
    _measured.clear()
    with _cache_lock:
        _cache.clear()
        FAST.clear()
        _ran.clear()
