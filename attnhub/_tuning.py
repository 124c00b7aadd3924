"""Selection by measurement: time every eligible backend once per decision key and keep the fastest.

Off by default (static priorities from `registry.yaml` decide). On with `ATTNHUB_TUNE=1` (measures on the first
call of each new key) or explicitly with `attnhub.tune(q, k, v, rope=...)`. Results persist in
`$ATTNHUB_CACHE_DIR/tune.json` (default `~/.cache/attnhub`), keyed by device name and library versions, so a later
process with `ATTNHUB_TUNE=1` starts with the measured choice. Each backend is timed after
`wait_for_compiles` (public as `attnhub.wait_for_compiles`), so kernels compiling in the background do not skew it.

tune.json: {environment: {key: backend name}}. The key is the decision key plus the `candidates` measured (each
eligible backend with its implementation), so a registry change that adds, removes or re-points an eligible backend
finds no record and measures again. The file is a cache: one that cannot be read or parsed is ignored with a
warning naming it, and rewritten at the next measurement.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from attnhub import settings
from attnhub.registry import REGISTRY

log = logging.getLogger("attnhub.tune")  # named for what users know, `attnhub.tune`, not this private module

_lock = threading.Lock()
_results: dict[str, dict[str, str]] | None = None  # environment -> key -> backend; None: not loaded
_results_path: Path | None = None  # the file `_results` was loaded from


def enabled() -> bool:
    return settings.tune()


def _path() -> Path:
    return Path(settings.cache_dir()) / "tune.json"


def _environment(device_type: str, device_index: int | None) -> str:
    import importlib.metadata as md

    if device_type == "cuda":
        device = torch.cuda.get_device_name(device_index or 0)
    elif device_type == "cpu":
        device = f"cpu:{_cpu_name()}"
    else:
        device = device_type
    versions = []
    for pkg in ("attnhub", "torch", "triton"):
        try:
            versions.append(f"{pkg}={md.version(pkg)}")
        except md.PackageNotFoundError:
            versions.append(f"{pkg}=none")
    return "|".join([device, *versions])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _candidates(names: Sequence[str]) -> dict[str, str]:
    """name -> implementation of each backend measured (or to measure): part of the key."""
    specs = REGISTRY.specs()
    out = {}
    for name in sorted(names):
        impl = specs[name].impl if name in specs else None
        if callable(impl):
            impl = f"{getattr(impl, '__module__', '?')}:{getattr(impl, '__qualname__', repr(impl))}"
        out[name] = str(impl)
    return out


def _key(call, candidates: Sequence[str]) -> str:
    return json.dumps({**call.facts(), "candidates": _candidates(candidates)}, sort_keys=True)


def _read(path: Path, *, warn: bool = True) -> dict[str, Any]:
    """The results stored in `path`; {} (with a warning naming the file) when it is unreadable or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if warn:
            log.warning("attnhub tune: cannot read %s (%s); ignoring it, measuring again", path, exc)
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        data = exc
    if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
        if warn:
            log.warning(
                "attnhub tune: ignoring corrupt %s (%s); measuring again, the file is rewritten at the next "
                "measurement", path, data if isinstance(data, ValueError) else "expected {environment: {key: backend}}",
            )
        return {}
    return data


def _table(call) -> dict[str, str]:
    """This environment's choices, loaded from tune.json on first use (and again if ATTNHUB_CACHE_DIR changes)."""
    global _results, _results_path
    with _lock:
        path = _path()
        if _results is None or _results_path != path:
            _results, _results_path = _read(path), path
        return _results.setdefault(_environment(call.device_type, call.device_index), {})


def lookup(call, eligible: Sequence[str]) -> str | None:
    """The measured choice for `call`, if one was recorded among exactly the backends now eligible (same impls)."""
    if not enabled() and _results is None:
        return None
    name = _table(call).get(_key(call, eligible))
    return name if name in eligible else None


def wait_for_compiles(timeout: float | None = None) -> int:
    """Block until the kernels compiling in the background are ready; -> how many were waited for.

    triton_fa_rope's Gluon forwards compile in a background thread at a shape's first call while its Triton forward
    serves the calls (ATTNHUB_TRITON_BACKGROUND_COMPILE, `attnhub.settings`): call this before timing a model or
    capturing a CUDA graph, so both see the kernels that serve the shape from then on. Raises `TimeoutError` when
    `timeout` seconds pass first. Also waits for the C++ replay of training calls if its build has started
    (ATTNHUB_TRITON_REPLAY)."""
    replay = sys.modules.get("attnhub.backends._replay")
    if replay is not None:
        replay.wait(timeout)
    runtime = sys.modules.get("attnhub.backends._triton_runtime")
    return 0 if runtime is None else runtime.wait_for_compiles(timeout)  # not imported: nothing compiles


def _time_ms(run: Callable[[], None], device: torch.device, reps: int = 20) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    wait_for_compiles()  # time the kernels that serve the call from now on, not those serving while they compile
    for _ in range(2):
        run()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        run()
    sync()
    return (time.perf_counter() - start) * 1e3 / reps


def measure(call, entries: Sequence[tuple[str, Callable]], q, k, v, rope, scale: float) -> str:
    """Time each (name, fn) on fresh copies of q, k, v (forward, plus backward if the call needs grad)."""
    times = {}
    for name, fn in entries:
        qq, kk, vv = (t.detach().clone().requires_grad_(call.needs_grad) for t in (q, k, v))

        def run():
            out = fn(qq, kk, vv, rope, scale)
            if call.needs_grad:
                out.backward(torch.ones_like(out))

        times[name] = _time_ms(run, q.device)
    best = min(times, key=times.__getitem__)
    env, key = _environment(call.device_type, call.device_index), _key(call, list(times))
    log.info("attnhub tune: %s -> %s (%s)", key, best, {n: f"{t:.3f} ms" for n, t in times.items()})
    _table(call)[key] = best
    _save(env, key, best)
    return best


def _save(env: str, key: str, best: str) -> None:
    """Write one choice into tune.json, merged with what other processes wrote since we loaded it."""
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock:
            data = _read(path, warn=False)  # a corrupt file was reported when loaded
            data.setdefault(env, {})[key] = best
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
            tmp.replace(path)
    except OSError as exc:  # a read-only home must not break attention; the choice still holds in memory
        log.warning("attnhub tune: could not save %s: %s", path, exc)
