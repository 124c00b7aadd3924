"""Test session set-up.

Without CUDA, the Triton backend runs in the CPU interpreter: TRITON_INTERPRET must be set before triton
compiles anything, so it is set here, at collection. Tests marked `gpu` are skipped without CUDA, tests marked
`multigpu` with fewer than two GPUs; tests marked `slow` run only with ATTNHUB_SLOW=1.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never read or write a user's tuning cache or pick up a user's registry or forced backend.
for var in ("ATTNHUB_BACKEND", "ATTNHUB_DISABLE", "ATTNHUB_REGISTRY", "ATTNHUB_TUNE"):
    os.environ.pop(var, None)
# Every call runs the kernel the config table picks for it, from its first call on: no Triton forward serving while
# a Gluon forward compiles in the background (tests/backends/test_triton_runtime.py turns it on where it tests it).
os.environ["ATTNHUB_TRITON_BACKGROUND_COMPILE"] = "0"
_STARTED: list = []  # test modules whose background processes `pytest_collection_finish` started


def pytest_collection_finish(session):
    """The offline sm_90 compile check takes minutes in processes of its own: started now where it was collected,
    they compile while the other tests run (not in an xdist worker: each would start them)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None and not session.config.option.collectonly:
        for item in session.items:
            if item.nodeid.endswith("test_sm90.py::test_every_launch_compiles_for_sm90"):
                item.module.start_matrix(alone=len(session.items) == 1)
                _STARTED.append(item.module)


def pytest_sessionfinish(session):
    for module in _STARTED:  # a session that ended before the test (-x, a keyboard interrupt): no process left behind
        module.stop_matrix()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the lent H100: pytest -m gpu)")
    skip_slow = pytest.mark.skip(reason="slow: set ATTNHUB_SLOW=1")
    skip_multigpu = pytest.mark.skip(reason="needs two CUDA GPUs (run on the lent 2x H200: pytest -m multigpu)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and torch.cuda.device_count() < 2:
            item.add_marker(skip_multigpu)
        if "slow" in item.keywords and os.environ.get("ATTNHUB_SLOW") != "1":
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test: its own tuning-cache folder, no forced backend, and a registry restored afterwards."""
    from attnhub import select

    monkeypatch.setenv("ATTNHUB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNHUB_BACKEND", raising=False)
    monkeypatch.delenv("ATTNHUB_DISABLE", raising=False)
    snapshot = select.REGISTRY.snapshot() if hasattr(select.REGISTRY, "snapshot") else None
    yield
    if snapshot is not None:
        select.REGISTRY.restore(snapshot)
    select.clear_cache()


@pytest.fixture
def nan_empty():
    """Every floating `torch.empty` / `torch.empty_like` buffer comes NaN-filled (`attnhub.benchkit.nan_empty`), so a
    kernel that leaves part of its output (or a scratch it reads) unwritten fails its test instead of passing on
    stale zeros."""
    from attnhub import benchkit

    with benchkit.nan_empty():
        yield
