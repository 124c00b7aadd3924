"""attnhub's switches: the one reader of every ATTNHUB_* environment variable the library reads.

Each variable is read when it is used (not once at import), so a change of `os.environ` takes effect at the next
call; an invalid value raises `ValueError` naming the variable, at that use.

    ATTNHUB_BACKEND               a backend name forced on every `attnhub.attention` call (below the per-call
                                  `backend=`, a module pin and `attnhub.use_backend`); unset or empty: automatic
                                  selection.
    ATTNHUB_DISABLE               comma-separated backend names that selection never picks (a deny-list, joined
                                  with `attnhub.disable_backends`); forcing or pinning one of them is an error.
                                  Unset or empty: none. An empty name ("a,,b") is an error here; an unknown one is
                                  an `UnknownBackendError` at the next `attnhub.attention` call.
    ATTNHUB_REGISTRY              path of a YAML overlay of `registry.yaml`, read when the registry is built (at
                                  `import attnhub`); unset or empty: none.
    ATTNHUB_TUNE                  "1": select by measurement on the first call of each decision key; unset, empty
                                  or "0": static priorities.
    ATTNHUB_CACHE_DIR             folder of the tuning cache `tune.json`; unset or empty: ~/.cache/attnhub.
    ATTNHUB_MEASURED              path of a measured-winners file used instead of the shipped `measured.yaml`
                                  (attnhub/_measured.py says its format); unset or empty: the shipped one. Read
                                  when a decision key is first decided: `attnhub.select.clear_cache()` after a change.
    ATTNHUB_TRITON_BWD            triton_fa_rope's backward path: "auto" (default; by the config's
                                  bwd_fused_max_n), "fused" (one launch) or "split" (three launches).
    ATTNHUB_TRITON_COMPILE_AHEAD  "1" (default): the first training call of a shape compiles all its Triton kernels
                                  in parallel before launching; "0": each compiles at its launch.
    ATTNHUB_TRITON_BACKGROUND_COMPILE  "1" (default): a Gluon forward of triton_fa_rope compiles in a background
                                  thread at its shape's first call (2.5-3 s), the Triton forward serving the calls
                                  until it is done (never with torch.use_deterministic_algorithms(True));
                                  `attnhub.wait_for_compiles()` waits for it. "0": it compiles at its first launch.
    ATTNHUB_TRITON_LAUNCHER       "driver" (default): a Triton backend's cached launches call the CUDA driver with
                                  parameters packed once, where that launches exactly what Triton's launcher would
                                  (Triton 3.6); "triton": always Triton's launcher. Read when a kernel
                                  specialization is first launched (`attnhub.backends._driver_launch`).
    ATTNHUB_TRITON_REPLAY         "1" (default): from its second call on, a cached eager training call of
                                  triton_fa_rope runs its forward and backward launches from C++, each one call from
                                  Python (`attnhub.backends._replay`, built once per machine in a background thread:
                                  a C++ compiler and ninja needed; the Python path serves until then, and where the
                                  build fails). "0": always the Python path.

The test suite reads two of its own (tests/conftest.py): ATTNHUB_SLOW=1 runs the `slow` tests, and
ATTNHUB_HYPOTHESIS_EXAMPLES sets the randomized parity budget.

Tests and benchmarks change a setting with `override` (process-wide while the block runs, so the backward, which
autograd may run on another thread, sees it too), never by assigning module variables:

    with attnhub.settings.override(triton_bwd="fused", compile_ahead=False):
        ...
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Iterator

TRITON_BWD_PATHS = ("auto", "fused", "split")
_OVERRIDES: dict[str, Any] = {}


def _getter(name: str) -> Callable[[], str | None]:
    """A function that returns `os.environ.get(name)`, always current, in tens of nanoseconds instead of ~1.5 µs.

    On POSIX `os.environ` keeps its bytes mapping `_data` in step with every change made through `os.environ`
    (`monkeypatch.setenv` included), so reading that mapping is exact; elsewhere (Windows folds key case) this
    falls back to `os.environ.get`.
    """
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return lambda: os.environ.get(name)
    key = os.fsencode(name)

    def get() -> str | None:
        value = data.get(key)
        return None if value is None else os.fsdecode(value)

    return get


_backend = _getter("ATTNHUB_BACKEND")
_disable = _getter("ATTNHUB_DISABLE")
_registry = _getter("ATTNHUB_REGISTRY")
_tune = _getter("ATTNHUB_TUNE")
_cache_dir = _getter("ATTNHUB_CACHE_DIR")
_measured = _getter("ATTNHUB_MEASURED")
_triton_bwd = _getter("ATTNHUB_TRITON_BWD")
_compile_ahead = _getter("ATTNHUB_TRITON_COMPILE_AHEAD")
_background_compile = _getter("ATTNHUB_TRITON_BACKGROUND_COMPILE")
_triton_launcher = _getter("ATTNHUB_TRITON_LAUNCHER")
_triton_replay = _getter("ATTNHUB_TRITON_REPLAY")
TRITON_LAUNCHERS = ("driver", "triton")


def _switch(name: str, value: str | None, default: bool) -> bool:
    """A 0/1 variable: unset or empty -> default."""
    if value is None or value == "":
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


def _one_of(name: str, value: str | None, choices: tuple[str, ...]) -> str:
    """A variable with named values: unset or empty -> choices[0] (the default)."""
    value = value or choices[0]
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def backend() -> str | None:
    """ATTNHUB_BACKEND: the forced backend name, or None."""
    if "backend" in _OVERRIDES:
        return _OVERRIDES["backend"]
    return _backend() or None


def disable() -> tuple[str, ...]:
    """ATTNHUB_DISABLE: the denied backend names, in the order given (not checked against the registry here)."""
    if "disable" in _OVERRIDES:
        return _OVERRIDES["disable"]
    value = _disable()
    return _names("ATTNHUB_DISABLE", value) if value else ()


@functools.lru_cache(maxsize=64)  # read on every attention call: parse each distinct value once
def _names(name: str, value: str) -> tuple[str, ...]:
    """A comma-separated list of names; spaces around a name are ignored, an empty name is an error."""
    if not value:
        return ()
    names = tuple(n.strip() for n in value.split(","))
    if not all(names):
        raise ValueError(f"{name}={value!r}: an empty backend name; expected name[,name...]")
    return names


def registry() -> str | None:
    """ATTNHUB_REGISTRY: the overlay file's path, or None."""
    if "registry" in _OVERRIDES:
        return _OVERRIDES["registry"]
    return _registry() or None


def tune() -> bool:
    """ATTNHUB_TUNE: select by measurement."""
    if "tune" in _OVERRIDES:
        return _OVERRIDES["tune"]
    return _switch("ATTNHUB_TUNE", _tune(), False)


def cache_dir() -> str:
    """ATTNHUB_CACHE_DIR: the tuning cache's folder."""
    if "cache_dir" in _OVERRIDES:
        return _OVERRIDES["cache_dir"]
    return _cache_dir() or os.path.join(os.path.expanduser("~"), ".cache", "attnhub")


def measured_path() -> str | None:
    """ATTNHUB_MEASURED: the measured-winners file's path, or None for the shipped one."""
    if "measured" in _OVERRIDES:
        return _OVERRIDES["measured"]
    return _measured() or None


def triton_bwd() -> str:
    """ATTNHUB_TRITON_BWD: "auto", "fused" or "split"."""
    if "triton_bwd" in _OVERRIDES:
        return _OVERRIDES["triton_bwd"]
    return _one_of("ATTNHUB_TRITON_BWD", _triton_bwd(), TRITON_BWD_PATHS)


def compile_ahead() -> bool:
    """ATTNHUB_TRITON_COMPILE_AHEAD: compile a training call's kernels ahead (where Triton can)."""
    if "compile_ahead" in _OVERRIDES:
        return _OVERRIDES["compile_ahead"]
    return _switch("ATTNHUB_TRITON_COMPILE_AHEAD", _compile_ahead(), True)


def background_compile() -> bool:
    """ATTNHUB_TRITON_BACKGROUND_COMPILE: compile a Gluon forward in the background, the Triton one serving."""
    if "background_compile" in _OVERRIDES:
        return _OVERRIDES["background_compile"]
    return _switch("ATTNHUB_TRITON_BACKGROUND_COMPILE", _background_compile(), True)


def triton_launcher() -> str:
    """ATTNHUB_TRITON_LAUNCHER: "driver" or "triton"."""
    if "triton_launcher" in _OVERRIDES:
        return _OVERRIDES["triton_launcher"]
    return _one_of("ATTNHUB_TRITON_LAUNCHER", _triton_launcher(), TRITON_LAUNCHERS)


def triton_replay() -> bool:
    """ATTNHUB_TRITON_REPLAY: replay cached eager training calls of triton_fa_rope from C++."""
    if "triton_replay" in _OVERRIDES:
        return _OVERRIDES["triton_replay"]
    return _switch("ATTNHUB_TRITON_REPLAY", _triton_replay(), True)


def _check_override(name: str, value: Any) -> None:
    ok = {
        "backend": lambda v: v is None or isinstance(v, str),
        "disable": lambda v: isinstance(v, tuple) and all(isinstance(n, str) and n for n in v),
        "registry": lambda v: v is None or isinstance(v, str),
        "tune": lambda v: isinstance(v, bool),
        "cache_dir": lambda v: isinstance(v, str),
        "measured": lambda v: v is None or isinstance(v, str),
        "triton_bwd": lambda v: v in TRITON_BWD_PATHS,
        "compile_ahead": lambda v: isinstance(v, bool),
        "background_compile": lambda v: isinstance(v, bool),
        "triton_launcher": lambda v: v in TRITON_LAUNCHERS,
        "triton_replay": lambda v: isinstance(v, bool),
    }
    if name not in ok:
        raise TypeError(f"settings.override: unknown setting {name!r}; known: {sorted(ok)}")
    if not ok[name](value):
        raise ValueError(f"settings.override: {name}={value!r} is not a valid value (see attnhub.settings)")


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Within the block, the named settings take these values instead of the environment's; nests.

    Names: backend, disable (a tuple of names), registry, tune, cache_dir, measured, triton_bwd, compile_ahead,
    background_compile, triton_launcher, triton_replay (see the module docstring)."""
    for name, value in values.items():
        _check_override(name, value)
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(values)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)
