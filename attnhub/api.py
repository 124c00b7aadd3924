"""The public entry: `attention()` (and `attention_packed()` of a fused qkv projection), forcing a backend,
`explain()`, `tune()`, `list_backends()`.

One call: validate the inputs (here, before anything launches) -> the decision key `select.Call.from_inputs` ->
`select.choose` (cached) -> the backend's entry function `fn(q, k, v, rope, scale)`, called with
`key_padding_mask=` as well when a mask is given (only backends declaring `key_padding` are chosen then). A repeated
call skips the middle: `select.fast_key` of its raw facts finds the entry function directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from attnhub import _tuning, control, select
from attnhub._tuning import wait_for_compiles  # noqa: F401  (public, as attnhub.wait_for_compiles)
from attnhub.control import use_backend  # noqa: F401  (public, as attnhub.use_backend)
from attnhub.rope import CosSinTable


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: CosSinTable | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention with optional 2D RoPE on q and k, by the best backend for this call.

    q: [B, H, N, D]; k, v: [B, H_kv, N_kv, D] (N_kv == N with `rope`), any strides. Grouped k/v heads: H a
    multiple of H_kv, query head h uses k/v head h // (H // H_kv) (as SDPA's `enable_gqa`). `rope`: a
    `CosSinTable` with `rope.seq_len == N` (one table, per head, per sample, or from coordinates).
    `key_padding_mask`: bool [B, N_kv], True = attend to this key; every query row (padded ones too) sees only
    valid keys, and a sample with no valid key gets o = 0 and zero gradients. `scale` defaults to D ** -0.5.
    `backend` forces one backend for this call (it wins over a module pin, `use_backend` and `ATTNHUB_BACKEND`: see
    attnhub.control). Returns o: [B, H, N, D] in q's dtype, or in the autocast dtype under `torch.autocast`, for
    every backend alike.
    """
    return _attention(q, k, v, rope, scale, backend, key_padding_mask, None)


def attention_packed(
    qkv: torch.Tensor,
    rope: CosSinTable | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`attention(q, k, v, ...)` of a fused qkv projection: qkv: [B, N, 3, H, D] (timm's
    `self.qkv(x).reshape(B, N, 3, H, D)`), q, k, v its three parts -> o: [B, H, N, D].

    The same function, choice of backend and errors as `attention` on the views
    `qkv.permute(2, 0, 3, 1, 4).unbind(0)`; the gradient reaches qkv as one tensor, and a backend declaring
    `packed_qkv` (triton_fa_rope) writes it whole instead of three gradients that the views' backward would copy
    into one.
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"attnhub.attention_packed: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attnhub.attention_packed: qkv must be [B, N, 3, H, D], got shape {tuple(qkv.shape)}; "
                         "reshape a fused projection's [B, N, 3 * H * D] output to it")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return _attention(q, k, v, rope, scale, backend, key_padding_mask, qkv)


def _attention(q, k, v, rope, scale, backend, mask, qkv):
    """attention(); qkv: the [B, N, 3, H, D] tensor q, k, v are the views of (`attention_packed`) or None."""
    if torch.compiler.is_compiling():
        return _compiled_attention(q, k, v, rope, scale, backend, mask, qkv)
    autocast = False
    try:  # the fast path: one dict lookup keyed on every fact that validation and selection read
        autocast = torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(q.device.type)
        key = select.fast_key(q, k, v, rope, control.state(backend), scale, autocast, mask)
        hit = select.FAST.get(key)
    except (AttributeError, TypeError):  # not tensors, not a table: validation below names the argument
        key, hit = None, None
    if hit is None or not (scale is None or (type(scale) in (float, int) and math.isfinite(scale))):
        ctl = control.resolve(backend, control.current_pin())  # (forced, by whom, disabled)
        _validate(q, k, v, rope, scale, backend, mask)
        fn, out = _choose_and_run(q, k, v, rope, scale, ctl, mask, autocast, qkv)
        if key is not None:  # only once a run succeeded: until then a failing backend may still fall back
            select.remember_fast(key, fn, _scale(q, None))
        return out
    fn, default_scale, takes_qkv = hit
    scale = default_scale if scale is None else float(scale)
    qkv = qkv if takes_qkv else None
    if autocast or mask is not None or qkv is not None:
        return _call_entry(fn, q, k, v, rope, scale, mask, autocast, qkv)
    return fn(q, k, v, rope, scale)  # what `_call_entry` would do here, without its two calls


def _call_entry(fn, q, k, v, rope, scale: float, mask, autocast: bool, qkv=None) -> torch.Tensor:
    if autocast:  # every backend computes in the autocast dtype, none re-autocasts inside
        q, k, v = _autocast_inputs(q, k, v)
        if qkv is not None and q.dtype != qkv.dtype:  # cast into new tensors: no longer qkv's views
            qkv = None
        with torch.autocast(q.device.type, enabled=False):
            return _run(fn, q, k, v, rope, scale, mask, qkv)
    return _run(fn, q, k, v, rope, scale, mask, qkv)


def _run(fn, q, k, v, rope, scale, key_padding_mask, qkv=None):
    # the entry gets key_padding_mask= only with a mask (backends registered before masks existed take five
    # arguments), and qkv= only when given (callers give it only to entries declaring packed_qkv: `_packed_for`)
    kwargs = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
    if qkv is not None:
        kwargs["qkv"] = qkv
    return fn(q, k, v, rope, scale, **kwargs)


def _packed_for(fn, qkv):
    """qkv for an entry that takes it (its backend declares packed_qkv), else None."""
    return qkv if qkv is not None and select.REGISTRY.takes_qkv(fn) else None


def _choose_and_run(q, k, v, rope, scale, ctl, key_padding_mask, autocast, qkv=None):
    """Slow path: build the decision key, select (maybe measure) and run, through `select.run` (the fallback)."""
    scale = _scale(q, scale)
    cq, ck, cv = _autocast_inputs(q, k, v)
    call = select.Call.from_inputs(cq, ck, cv, rope, ctl, key_padding_mask)
    measure = None
    if _tuning.enabled():
        measure = lambda names: _tuning.measure(  # noqa: E731
            call, _entries(names, key_padding_mask), cq, ck, cv, rope, scale
        )
    return select.run(call, lambda fn: _call_entry(fn, q, k, v, rope, scale, key_padding_mask, autocast,
                                                   _packed_for(fn, qkv)), measure)


def _compiled_attention(q, k, v, rope, scale, backend, key_padding_mask, qkv=None):
    """Inside `torch.compile`: the decision is made once, at trace time, and baked into the graph.

    Only static facts enter it (device, dtype, head_dim, sequence lengths, RoPE signature, grad mode), so the
    batch size may be dynamic and a cached graph never re-dispatches. Backends must be traceable; the Triton
    backend runs as `torch.ops.attnhub.*` custom operators there. Changing the forced or disabled backends
    takes effect at the next compilation; changing a module pin recompiles (Dynamo guards on it). There is no
    fallback here: a backend that fails while traced, or when the graph runs, raises (rule it out with
    ATTNHUB_DISABLE or `disable_backends` and compile again).
    """
    _validate(q, k, v, rope, scale, backend, key_padding_mask)
    scale = _scale(q, scale)
    q, k, v = _autocast_inputs(q, k, v)
    if qkv is not None and q.dtype != qkv.dtype:  # cast into new tensors: no longer qkv's views
        qkv = None
    # the pin is read here, traced: the pin hooks' pushes exist only in the graph being traced
    name = _static_choice(backend, control.current_pin(),
                          *select.Call.from_inputs(q, k, v, rope, None, key_padding_mask, static=True))
    fn = select.REGISTRY.entry(name)
    with torch.autocast(q.device.type, enabled=False):
        return _run(fn, q, k, v, rope, scale, key_padding_mask, _packed_for(fn, qkv))


@torch.compiler.assume_constant_result
def _static_choice(backend: str | None, pin: tuple[str, str] | None, *static_facts) -> str:
    """The backend for a `Call` of static facts, run once at trace time: the forced and disabled backends and the
    registry version are read here, outside the graph, so they add no guards."""
    forced, by, disabled = control.resolve(backend, pin)
    call = select.Call(*static_facts)._replace(forced=forced, forced_by=by, disabled=disabled,
                                               registry_version=select.REGISTRY.version)
    return select.choose(call)[0]


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: CosSinTable | None = None,
    *,
    backend: str | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> select.Explanation:
    """Which backend `attention(q, k, v, rope, key_padding_mask=...)` would run here and why every other one
    would not.

    "Here": with the forced, pinned and disabled backends in effect at this point (called inside a pinned
    module's forward, its pin applies), and the backends that failed at run time for this call."""
    _validate(q, k, v, rope, None, backend, key_padding_mask)
    q, k, v = _autocast_inputs(q, k, v)
    ctl = control.resolve(backend, control.current_pin())
    return select.explain(select.Call.from_inputs(q, k, v, rope, ctl, key_padding_mask))


def tune(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: CosSinTable | None = None,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> str:
    """Time every backend eligible for this call, remember (and persist) the fastest, return its name.

    Later `attention` calls with the same decision key run it; `explain` reports it as "fastest when measured".
    """
    _validate(q, k, v, rope, scale, None, key_padding_mask)
    q, k, v = _autocast_inputs(q, k, v)  # the key `attention` will look up under the same autocast
    call = select.Call.from_inputs(q, k, v, rope, (None, None, control.resolve(None, None)[2]), key_padding_mask)
    names = [n for n, why in select.explain(call).reasons.items() if not why]
    if not names:
        raise select.BackendUnavailableError("no attnhub backend can run this call:\n" + str(select.explain(call)))
    best = _tuning.measure(call, _entries(names, key_padding_mask), q, k, v, rope, _scale(q, scale))
    select.clear_cache()
    return best


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    priority: int
    available: bool
    why_not: str  # empty when available
    description: str


def list_backends() -> list[BackendInfo]:
    """Every registered backend, highest priority first, with whether it can run on this machine and why not.

    Available means: selection would consider it for some device of this machine (its modules import, the device
    and its compute capability are ones it is selected on, and it is not disabled here); the reasons are the ones
    `explain` gives.
    """
    devices = [("cpu", None)] + ([("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else [])
    disabled = dict(control.resolve(None, None)[2])
    out = []
    for name, spec in sorted(select.REGISTRY.specs().items(), key=lambda kv: (-kv[1].priority, kv[0])):
        per_device = [select.device_reasons(spec, d, i, forced=False) for d, i in devices]
        why = [] if not all(per_device) else list(dict.fromkeys(r for rs in per_device for r in rs))
        if name in disabled:
            why.append(f"disabled by {disabled[name]}")
        out.append(BackendInfo(name, spec.priority, not why, "; ".join(why), spec.description))
    return out


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _autocast_inputs(q, k, v):
    """q, k, v in the autocast dtype when autocast is on for their device (every backend alike), else as given."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def _entries(names, key_padding_mask=None):
    """(name, entry) pairs to measure, each taking the call's mask when there is one."""
    entries = [(n, select.REGISTRY.entry(n)) for n in names]
    if key_padding_mask is None:
        return entries
    return [(n, functools.partial(fn, key_padding_mask=key_padding_mask)) for n, fn in entries]


def _validate(q, k, v, rope, scale, backend, key_padding_mask=None) -> None:
    """Every check on user input, before anything runs. Errors name the argument, the expectation and the value."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (B, H, N, D), (Bk, Hk, Nk, Dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(
            f"attention: every dimension must be > 0, got q {tuple(q.shape)}, k/v {tuple(k.shape)} "
            "(an empty batch has no attention to compute: skip the call)"
        )
    if (B, D) != (Bk, Dk):
        raise ValueError(
            f"attention: q [B, H, N, D] = {tuple(q.shape)} and k/v [B, H_kv, N_kv, D] = {tuple(k.shape)} must "
            "agree in B and D"
        )
    if H % Hk:
        raise ValueError(
            f"attention: q has H = {H} heads and k/v have H_kv = {Hk}: H must be a multiple of H_kv "
            "(grouped k/v heads: query head h uses k/v head h // (H // H_kv))"
        )
    if scale is not None:
        _check_scale(scale)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"attention: backend must be a str or None, got {type(backend).__name__}")
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, B, Nk, q.device)
    if rope is None:
        return
    if not isinstance(rope, CosSinTable):
        raise TypeError(f"attention: rope must be an attnhub.CosSinTable or None, got {type(rope).__name__}")
    if rope.device != q.device:
        raise ValueError(f"attention: rope table is on {rope.device} but q is on {q.device}; use rope.to(q.device)")
    if rope.head_dim != D:
        raise ValueError(f"attention: rope table has head_dim {rope.head_dim} but q has D = {D}")
    if N != rope.seq_len or Nk != rope.seq_len:
        raise ValueError(
            f"attention: with rope, q and k must have N = prefix_tokens + patches = {rope.prefix_tokens} + "
            f"{rope.n_grid} = {rope.seq_len}, got N = {N} (q) and {Nk} (k)"
        )
    if rope.per_head and rope.heads != H:
        raise ValueError(f"attention: per-head rope table has {rope.heads} heads but q has H = {H}")
    if rope.per_head and Hk != H:
        raise ValueError(
            f"attention: a per-head rope table cannot be used with grouped k/v heads (H = {H}, H_kv = {Hk}): "
            "each k/v head would need the angles of several query heads; use one table for all heads"
        )
    if rope.batched and rope.batch != B:
        raise ValueError(f"attention: per-sample rope table has B = {rope.batch} tables but q has B = {B}")


def _check_key_padding_mask(mask, B: int, Nk: int, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"attention: key_padding_mask must be a bool tensor [B, N_kv] or None, got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"attention: key_padding_mask must be bool [B, N_kv] (True = attend to this key), got dtype {mask.dtype}; "
            "an additive float mask is not accepted"
        )
    if tuple(mask.shape) != (B, Nk):
        raise ValueError(
            f"attention: key_padding_mask must have shape [B, N_kv] = {(B, Nk)}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(
            f"attention: key_padding_mask is on {mask.device} but q is on {device}; move it to q's device"
        )


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"attention: scale must be a finite number (or None for D ** -0.5), got {scale!r}")
