"""attnhub: one attention call, the fastest correct backend for the shapes, dtype and device at hand.

    o = attnhub.attention(q, k, v, rope=attnhub.CosSinTable(grid=(14, 14), head_dim=64))
"""

from __future__ import annotations

import dataclasses
import importlib

import torch.fx

from attnhub.api import attention, explain, tune, use_backend
from attnhub.registry import REGISTRY, RegistryError, register_backend
from attnhub.rope import CosSinTable
from attnhub.select import BackendUnavailableError, Explanation, UnknownBackendError

__version__ = "0.1.0"

# Under FX symbolic tracing `attnhub.attention(...)` is one leaf node (it reads concrete shapes and dtypes to pick
# a backend); the graph calls it when it runs.
torch.fx.wrap("attention")

# Import the backends subpackage now, so that the `backends()` function defined below is the last binding of
# the name: a later `import attnhub.backends.<name>` must not replace it with the subpackage.
importlib.import_module("attnhub.backends")

__all__ = [
    "attention",
    "explain",
    "use_backend",
    "tune",
    "backends",
    "register_backend",
    "CosSinTable",
    "BackendInfo",
    "Explanation",
    "RegistryError",
    "UnknownBackendError",
    "BackendUnavailableError",
]


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    priority: int
    available: bool
    why_not: str  # empty when available
    description: str


def backends() -> list[BackendInfo]:
    """Every registered backend, highest priority first, with whether it can run on this machine and why not.

    Available means: its modules import and some device of this machine is one it is selected on.
    """
    import importlib.util

    import torch

    here = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    out = []
    for name, spec in sorted(REGISTRY.specs().items(), key=lambda kv: (-kv[1].priority, kv[0])):
        why = [f"needs Python module {m!r}" for m in spec.requires if importlib.util.find_spec(m) is None]
        if spec.devices is not None and not here & set(spec.devices):
            why.append(f"needs a device of {list(spec.devices)}; this machine has {sorted(here)}")
        elif spec.min_compute_capability and "cuda" in here and "cuda" in (spec.devices or ()):
            major, minor = torch.cuda.get_device_capability()
            if major + minor / 10 < spec.min_compute_capability:
                why.append(f"compute capability {major}.{minor} < {spec.min_compute_capability}")
        out.append(BackendInfo(name, spec.priority, not why, "; ".join(why), spec.description))
    return out
