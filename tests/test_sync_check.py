"""benchmarks/sync_check.py: which line a synchronizing call is charged to, and a CPU run (nothing syncs there)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from tests.helpers import load_script

pytest.importorskip("timm")


@pytest.fixture
def sync_check(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # its `bench_e2e` import
    return load_script("sync_check")


def test_a_sync_is_charged_to_the_innermost_line_outside_torch(sync_check):
    """Outermost first, as `traceback.extract_stack` lists them; the venv of the GPU image lives under /opt/torch."""
    frame = traceback.FrameSummary
    site = "/opt/torch/.venv/lib/python3.12/site-packages"
    stack = [frame("/work/main/benchmarks/sync_check.py", 40, "step"),
             frame(f"{site}/timm/models/naflexvit.py", 10, "calculate_naflex_grid_sizes"),
             frame(f"{site}/torch/_tensor.py", 5, "item"),
             frame("/usr/lib/python3.12/warnings.py", 1, "_showwarnmsg")]
    assert sync_check._where(stack) == "timm/models/naflexvit.py:10 calculate_naflex_grid_sizes"
    assert sync_check._where(stack[2:]) == "?"


def test_cpu_run_counts_nothing(sync_check, capsys):
    sync_check.main(["--device", "cpu", "--depth", "1", "--batch", "2", "--seq-len", "64", "--steps", "1"])
    out = capsys.readouterr().out
    assert "timm: 0 synchronizing calls in 1 steps" in out and "attnhub: 0 synchronizing calls in 1 steps" in out
