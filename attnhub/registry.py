"""The backend registry: `registry.yaml`, the `ATTNHUB_REGISTRY` overlay, entry points, run-time registration.

A backend is a name, an entry function `fn(q, k, v, rope, scale) -> Tensor` and a `Spec` of constraints in the
vocabulary documented at the top of `registry.yaml`. This module only parses and stores; `attnhub.select` decides.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import logging
import os
import threading
from typing import Any, Callable, Mapping

import torch
import yaml

from attnhub import settings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "attnhub.backends"
ROPE_LAYOUTS = ("none", "interleaved", "half")
_DTYPES = {
    name: getattr(torch, name) for name in ("float16", "bfloat16", "float32", "float64")
}


class RegistryError(ValueError):
    """A registry entry is malformed; the message names the source, the backend and the field."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one backend can run. Field meanings: see the header of `registry.yaml`."""

    name: str
    impl: str | Callable
    priority: int
    source: str = "<runtime>"
    requires: tuple[str, ...] = ()
    devices: tuple[str, ...] | None = None
    interpreter_devices: tuple[str, ...] = ()
    min_compute_capability: float | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    head_dim: Mapping[str, int] = dataclasses.field(default_factory=dict)
    max_seq_len: int | None = None
    rope_layouts: tuple[str, ...] = ROPE_LAYOUTS
    rope_per_head: bool = True
    rope_grad: bool = True
    # newer capabilities default to False: a backend registered before they existed is never handed them
    rope_batched: bool = False
    rope_coords: bool = False
    key_padding: bool = False
    gqa: bool = False
    packed_qkv: bool = False
    cross_attention: bool = True
    backward: bool = True
    deterministic_backward: bool = False
    description: str = ""
    limits: str | None = None


def _as_tuple_of_str(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise RegistryError(f"{where}: expected a list of strings, got {value!r}")
    if not all(isinstance(v, str) for v in value):
        raise RegistryError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def _as_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise RegistryError(f"{where}: expected true or false, got {value!r}")
    return value


def _as_int(value: Any, where: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RegistryError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _as_dtypes(value: Any, where: str) -> tuple[torch.dtype, ...]:
    names = _as_tuple_of_str(value, where)
    unknown = [n for n in names if n not in _DTYPES]
    if unknown:
        raise RegistryError(f"{where}: unknown dtype(s) {unknown}; known: {sorted(_DTYPES)}")
    return tuple(_DTYPES[n] for n in names)


def _as_head_dim(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise RegistryError(f"{where}: expected a mapping with keys multiple_of/min/max, got {value!r}")
    unknown = set(value) - {"multiple_of", "min", "max"}
    if unknown:
        raise RegistryError(f"{where}: unknown key(s) {sorted(unknown)}; known: ['max', 'min', 'multiple_of']")
    return {k: _as_int(v, f"{where}.{k}") for k, v in value.items()}


def _as_layouts(value: Any, where: str) -> tuple[str, ...]:
    layouts = _as_tuple_of_str(value, where)
    unknown = [x for x in layouts if x not in ROPE_LAYOUTS]
    if unknown:
        raise RegistryError(f"{where}: unknown RoPE layout(s) {unknown}; known: {list(ROPE_LAYOUTS)}")
    return layouts


def _as_limits(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.count(":") != 1:
        raise RegistryError(f"{where}: expected 'module:attribute', got {value!r}")
    return value


def _as_impl(value: Any, where: str) -> str | Callable:
    if callable(value):
        return value
    if not isinstance(value, str) or value.count(":") != 1:
        raise RegistryError(f"{where}: expected 'module:function' or a callable, got {value!r}")
    return value


def _as_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RegistryError(f"{where}: expected a number, got {value!r}")
    return float(value)


_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "impl": _as_impl,
    "priority": lambda v, w: v if isinstance(v, int) and not isinstance(v, bool) else _raise(
        f"{w}: expected an integer, got {v!r}"
    ),
    "requires": _as_tuple_of_str,
    "devices": _as_tuple_of_str,
    "interpreter_devices": _as_tuple_of_str,
    "min_compute_capability": _as_float,
    "dtypes": _as_dtypes,
    "head_dim": _as_head_dim,
    "max_seq_len": lambda v, w: _as_int(v, w, allow_none=True),
    "rope_layouts": _as_layouts,
    "rope_per_head": _as_bool,
    "rope_grad": _as_bool,
    "rope_batched": _as_bool,
    "rope_coords": _as_bool,
    "key_padding": _as_bool,
    "gqa": _as_bool,
    "packed_qkv": _as_bool,
    "cross_attention": _as_bool,
    "backward": _as_bool,
    "deterministic_backward": _as_bool,
    "description": lambda v, w: v if isinstance(v, str) else _raise(f"{w}: expected a string, got {v!r}"),
    "limits": _as_limits,
}
CONSTRAINT_KEYS = frozenset(_PARSERS)


def _raise(msg: str):
    raise RegistryError(msg)


def parse_spec(name: str, fields: Mapping[str, Any], source: str, base: Spec | None = None) -> Spec:
    """One registry entry -> Spec. With `base`, the fields override an existing backend (an overlay)."""
    where = f"{source}: backend {name!r}"
    if not isinstance(name, str) or not name.isidentifier():
        raise RegistryError(f"{source}: backend name {name!r} must be an identifier")
    if not isinstance(fields, Mapping):
        raise RegistryError(f"{where}: expected a mapping of fields, got {fields!r}")
    unknown = set(fields) - CONSTRAINT_KEYS
    if unknown:
        raise RegistryError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(CONSTRAINT_KEYS)}")
    if base is None:
        for required in ("impl", "priority"):
            if required not in fields:
                raise RegistryError(f"{where}: missing required field {required!r}")
    parsed = {k: _PARSERS[k](v, f"{where}.{k}") for k, v in fields.items()}
    if base is None:
        spec = Spec(name=name, source=source, **parsed)
    else:
        spec = dataclasses.replace(base, source=f"{base.source} + {source}", **parsed)
    _check_limits(spec, where)
    return spec


def _check_limits(spec: Spec, where: str) -> None:
    """The entry allows no more than the backend's `limits` mapping says its code covers, e.g.
    {"head_dim": {"max": 256}, "max_seq_len": 65536}: a bound the entry leaves open or sets wider is an error.

    Skipped where a module in `requires` is not installed: the backend cannot be selected there anyway."""
    if spec.limits is None or any(importlib.util.find_spec(m) is None for m in spec.requires):
        return
    module, _, attr = spec.limits.partition(":")
    try:
        limits = getattr(importlib.import_module(module), attr)
    except Exception as exc:
        raise RegistryError(f"{where}.limits: could not load {spec.limits!r}: {type(exc).__name__}: {exc}") from exc
    for field, bound in limits.items():
        if field == "head_dim":
            for key, limit in bound.items():
                value = spec.head_dim.get(key)
                wider = value is None or (value > limit if key == "max" else value < limit if key == "min"
                                          else value % limit != 0)
                if wider:
                    raise RegistryError(
                        f"{where}.head_dim.{key}: {value} allows more than its code covers ({key} {limit}, from "
                        f"{spec.limits}); set head_dim.{key} within it")
        elif field == "max_seq_len":
            if spec.max_seq_len is None or spec.max_seq_len > bound:
                raise RegistryError(f"{where}.max_seq_len: {spec.max_seq_len} allows more than its code covers "
                                    f"({bound}, from {spec.limits})")
        else:
            raise RegistryError(f"{where}.limits: {spec.limits} names unknown field {field!r}")


def _parse_document(doc: Any, source: str, existing: Mapping[str, Spec]) -> dict[str, Spec]:
    if not isinstance(doc, Mapping) or set(doc) != {"backends"} or not isinstance(doc["backends"], Mapping):
        raise RegistryError(f"{source}: expected a top-level mapping with the single key 'backends'")
    return {
        name: parse_spec(name, fields, source, base=existing.get(name))
        for name, fields in doc["backends"].items()
    }


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{source}: not valid YAML: {exc}") from exc


class Registry:
    """Backends by name. Thread-safe; `version` changes on every mutation so callers can key caches on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._specs: dict[str, Spec] = {}
        self._fns: dict[str, Callable] = {}
        self.version = 0

    def specs(self) -> dict[str, Spec]:
        return dict(self._specs)

    def add(self, specs: Mapping[str, Spec]) -> None:
        with self._lock:
            self._specs.update(specs)
            for name in specs:
                self._fns.pop(name, None)
            self.version += 1

    def entry(self, name: str) -> Callable:
        """The backend's entry function, imported on first use."""
        fn = self._fns.get(name)
        if fn is None:
            impl = self._specs[name].impl
            if callable(impl):
                fn = impl
            else:
                module, _, attr = impl.partition(":")
                fn = getattr(importlib.import_module(module), attr)
            self._fns[name] = fn
        return fn

    def takes_qkv(self, fn: Callable) -> bool:
        """Whether `fn` is the loaded entry of a backend declaring packed_qkv (it takes the keyword qkv)."""
        return any(spec.packed_qkv and self._fns.get(name) is fn for name, spec in self._specs.items())

    def snapshot(self) -> dict[str, Spec]:
        """The current specs, for `restore` (tests, and code that registers backends temporarily)."""
        return self.specs()

    def restore(self, specs: Mapping[str, Spec]) -> None:
        with self._lock:
            self._specs = dict(specs)
            self._fns.clear()
            self.version += 1

    def load_file(self, path: str) -> None:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        self.add(_parse_document(_load_yaml(text, path), path, self._specs))


def _builtin_registry_text() -> tuple[str, str]:
    ref = importlib.resources.files("attnhub").joinpath("registry.yaml")
    return ref.read_text(encoding="utf-8"), str(ref)


def _load_entry_points(registry: Registry) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = f"entry point {ep.name!r} ({ep.value})"
        try:  # a broken plug-in must fail with its name, not with a bare ImportError from `import attnhub`
            obj = ep.load()
            spec_map = obj() if callable(obj) else obj
        except Exception as exc:
            raise RegistryError(f"{source}: could not load: {type(exc).__name__}: {exc}") from exc
        if not isinstance(spec_map, Mapping):
            raise RegistryError(f"{source}: expected a mapping of backend name -> fields, got {spec_map!r}")
        registry.add(_parse_document({"backends": spec_map}, source, registry.specs()))


def _build_default() -> Registry:
    registry = Registry()
    text, source = _builtin_registry_text()
    registry.add(_parse_document(_load_yaml(text, source), source, {}))
    _load_entry_points(registry)
    user_file = settings.registry()
    if user_file:
        registry.load_file(user_file)
    return registry


REGISTRY = _build_default()


def register_backend(name: str, impl: str | Callable, *, priority: int, **constraints: Any) -> None:
    """Register (or replace) a backend at run time, with the constraint vocabulary of `registry.yaml`.

    `impl` is the entry `fn(q, k, v, rope, scale) -> Tensor` or its "module:function" path. Example::

        attnhub.register_backend("mine", my_fn, priority=200, devices=["cuda"], dtypes=["bfloat16"])
    """
    fields = {"impl": impl, "priority": priority, **constraints}
    REGISTRY.add({name: parse_spec(name, fields, source="register_backend()")})
