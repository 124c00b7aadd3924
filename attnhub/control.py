"""What the user says about backends: force one, pin one on a module, rule some out.

Precedence of the forced backend, highest first: the per-call `backend=` argument > a module pin
(`pin_backend`, the innermost pinned module whose forward is running) > `use_backend` > ATTNHUB_BACKEND >
automatic selection. Ruled out: the union of ATTNHUB_DISABLE and every enclosing `disable_backends`.
`resolve` turns all of it into three facts of the decision key (`select.Call`): the forced name, who forced
it, and the disabled names with who disabled them; so a cached decision never outlives a change of them.

A pin works through two hooks on the module: the forward pre-hook pushes the pin on a per-thread stack, the
forward hook (always called, also when the forward raises) pops it, and `attention` reads the top. Under
`torch.compile(fullgraph=True)` Dynamo traces the hooks and the stack as plain Python, so the pin is a
constant of the graph; changing it recompiles (Dynamo guards on the module attribute).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from typing import Iterator

import torch.nn as nn

from attnhub import select, settings

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnhub_backend", default=None)
_DISABLED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("attnhub_disabled", default=())
_PINS = threading.local()  # .stack: [(backend, module label)] of the pinned modules whose forward is running
_PIN_ATTR, _HOOKS_ATTR = "_attnhub_pin", "_attnhub_pin_hooks"


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force backend `name` for `attention` calls in this context (thread- and task-local).

    None lifts an enclosing `use_backend` for this context: `ATTNHUB_BACKEND`, then automatic selection, apply.
    A per-call `backend=` and a module pin still win over this context.
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"use_backend: name must be a str or None, got {type(name).__name__}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


@contextlib.contextmanager
def disable_backends(*names: str) -> Iterator[None]:
    """Automatic selection skips backends `names` in this context (thread- and task-local; nests, adding to
    ATTNHUB_DISABLE and enclosing contexts); forcing or pinning one of them raises `BackendUnavailableError`."""
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"disable_backends: names must be backend names (str), got {type(name).__name__}")
    _check_known(names, "disable_backends")
    token = _DISABLED.set(tuple(dict.fromkeys(_DISABLED.get() + names)))
    try:
        yield
    finally:
        _DISABLED.reset(token)


def pin_backend(module: nn.Module, name: str | None) -> nn.Module:
    """Run every `attnhub.attention` call made inside `module`'s forward (its submodules' included) on backend
    `name`; None removes the pin. Returns `module`.

    A pin wins over `use_backend` and ATTNHUB_BACKEND, a per-call `backend=` wins over it, and the innermost
    pinned module wins over pins of modules around it. A pinned backend that cannot run a call raises
    `BackendUnavailableError` naming the module (never a fallback). An unknown name raises `UnknownBackendError`
    now.
    """
    return _pin(module, name, type(module).__name__ if isinstance(module, nn.Module) else "")


def pinned(model: nn.Module) -> dict[str, str]:
    """{qualified module name: pinned backend} over `model` and its submodules ("" is `model` itself)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pinned: model must be a torch.nn.Module, got {type(model).__name__}")
    return {n: m.__dict__[_PIN_ATTR][0] for n, m in model.named_modules() if _PIN_ATTR in m.__dict__}


def _pin(module: nn.Module, name: str | None, label: str) -> nn.Module:
    """`pin_backend` with the label that errors and `explain` name the module by (its qualified name when known)."""
    check_pin(module, name)
    if name is None:
        for handle in module.__dict__.pop(_HOOKS_ATTR, ()):
            handle.remove()
        module.__dict__.pop(_PIN_ATTR, None)
        return module
    module.__dict__[_PIN_ATTR] = (name, label)
    if _HOOKS_ATTR not in module.__dict__:
        # prepend: the push runs before any other pre-hook can raise, so the always-called pop always matches it
        module.__dict__[_HOOKS_ATTR] = (
            module.register_forward_pre_hook(_push, prepend=True),
            module.register_forward_hook(_pop, always_call=True),
        )
    return module


def check_pin(module: object, name: object) -> None:
    """The checks of `pin_backend`, apart, so that a caller pinning many modules checks all before changing any."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"pin_backend: module must be a torch.nn.Module, got {type(module).__name__}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"pin_backend: name must be a backend name (str) or None, got {type(name).__name__}")
    if name is not None:
        _check_known((name,), "pin_backend")


def _push(module: nn.Module, args) -> None:
    _stack().append(module._attnhub_pin)


def _pop(module: nn.Module, args, output) -> None:
    _stack().pop()


def _stack() -> list[tuple[str, str]]:
    stack = getattr(_PINS, "stack", None)
    if stack is None:
        stack = _PINS.stack = []
    return stack


def current_pin() -> tuple[str, str] | None:
    """(backend, module label) of the innermost pinned module whose forward is running in this thread, or None."""
    stack = _stack()
    return stack[-1] if stack else None


def state(backend: str | None) -> tuple:
    """Everything `resolve(backend, current_pin())` reads, unresolved: cheaper to build than its result, for the
    API's fast path to key on (equal states resolve alike). Raises where `resolve` does (an invalid
    ATTNHUB_DISABLE)."""
    stack = getattr(_PINS, "stack", None)
    return (backend, stack[-1] if stack else None, _FORCED.get(), settings.backend(), settings.disable(),
            _DISABLED.get())


def resolve(backend: str | None, pin: tuple[str, str] | None) -> tuple[str | None, str | None, tuple]:
    """(forced backend or None, who forced it, ((disabled name, who disabled it), ...)) for one call.

    `backend`: the per-call argument; `pin`: `current_pin()`, read by the caller (inside a compiled graph it is
    traced there, while this function runs at trace time)."""
    if backend:
        forced, by = backend, "forced by the backend= argument"
    elif pin is not None:
        forced, by = pin[0], f"pinned on {pin[1]}"
    elif (forced := _FORCED.get()):
        by = "forced by attnhub.use_backend"
    elif (forced := settings.backend()):
        by = "forced by ATTNHUB_BACKEND"
    else:
        by = None
    return forced, by, _disabled(settings.disable(), _DISABLED.get())


@functools.lru_cache(maxsize=256)  # read on every call; a process sees a handful of combinations
def _disabled(env: tuple[str, ...], context: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    by = {name: "attnhub.disable_backends" for name in context}
    by.update({name: "ATTNHUB_DISABLE" for name in env})
    return tuple(sorted(by.items()))


def _check_known(names, what: str) -> None:
    known = select.REGISTRY.specs()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise select.UnknownBackendError(f"{what}: unknown attnhub backend(s) {unknown}; known: {sorted(known)}")
