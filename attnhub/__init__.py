"""attnhub: one attention call, the fastest correct backend for the shapes, dtype and device at hand.

    o = attnhub.attention(q, k, v, rope=attnhub.CosSinTable(grid=(14, 14), head_dim=64))
"""

from __future__ import annotations

import torch.fx

from attnhub.api import (BackendInfo, attention, attention_packed, explain, list_backends, tune, use_backend,
                         wait_for_compiles)
from attnhub.control import disable_backends, pin_backend, pinned
from attnhub.registry import REGISTRY, RegistryError, register_backend
from attnhub.rope import CosSinTable
from attnhub.select import BackendUnavailableError, Explanation, UnknownBackendError

__version__ = "0.1.0"

# Under FX symbolic tracing `attnhub.attention(...)` (and `attention_packed`) is one leaf node (it reads concrete
# shapes and dtypes to pick a backend); the graph calls it when it runs.
torch.fx.wrap("attention")
torch.fx.wrap("attention_packed")

__all__ = [
    "attention",
    "attention_packed",
    "explain",
    "use_backend",
    "pin_backend",
    "pinned",
    "disable_backends",
    "tune",
    "wait_for_compiles",
    "list_backends",
    "register_backend",
    "CosSinTable",
    "BackendInfo",
    "Explanation",
    "RegistryError",
    "UnknownBackendError",
    "BackendUnavailableError",
]
