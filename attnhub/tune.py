"""Selection by measurement: time every eligible backend once per decision key and keep the fastest.

Off by default (static priorities from `registry.yaml` decide). On with `ATTNHUB_TUNE=1` (measures on the first
call of each new key) or explicitly with `attnhub.tune(q, k, v, rope=...)`. Results persist in
`$ATTNHUB_CACHE_DIR/tune.json` (default `~/.cache/attnhub`), keyed by device name and library versions, so a later
process starts with the measured choice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_results: dict[str, dict[str, str]] | None = None  # environment -> decision key -> backend


def enabled() -> bool:
    return os.environ.get("ATTNHUB_TUNE", "0") == "1"


def _path() -> Path:
    root = os.environ.get("ATTNHUB_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "attnhub")
    return Path(root) / "tune.json"


def _environment(device_type: str, device_index: int | None) -> str:
    import importlib.metadata as md

    if device_type == "cuda":
        device = torch.cuda.get_device_name(device_index or 0)
    else:
        device = device_type
    versions = []
    for pkg in ("attnhub", "torch", "triton"):
        try:
            versions.append(f"{pkg}={md.version(pkg)}")
        except md.PackageNotFoundError:
            versions.append(f"{pkg}=none")
    return "|".join([device, *versions])


def _key(call) -> str:
    fields = call._asdict()
    fields.pop("forced")
    fields.pop("registry_version")
    fields["dtype"] = str(fields["dtype"])
    return json.dumps(fields, sort_keys=True)


def _table(call) -> dict[str, str]:
    global _results
    with _lock:
        if _results is None:
            try:
                _results = json.loads(_path().read_text())
            except (OSError, ValueError):
                _results = {}
        return _results.setdefault(_environment(call.device_type, call.device_index), {})


def lookup(call, eligible: Sequence[str]) -> str | None:
    """The measured choice for `call`, if one was recorded and is still eligible."""
    if not enabled() and _results is None:
        return None
    name = _table(call).get(_key(call))
    return name if name in eligible else None


def _time_ms(run: Callable[[], None], device: torch.device, reps: int = 20) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
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
    best = min(times, key=times.get)
    log.info("attnhub tune: %s -> %s (%s)", _key(call), best, {n: f"{t:.3f} ms" for n, t in times.items()})
    _table(call)[_key(call)] = best
    _save()
    return best


def _save() -> None:
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_results, indent=1, sort_keys=True))
            tmp.replace(path)
    except OSError as exc:  # a read-only home must not break attention; the choice still holds in memory
        log.warning("attnhub tune: could not save %s: %s", path, exc)
