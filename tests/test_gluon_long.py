"""benchmarks/gluon_long.py's summary on the CPU (the script itself needs a Hopper GPU): per shape and pass, the long
kernel's baseline (one attending partition) against its fastest variant."""

from __future__ import annotations

import pytest

from tests.helpers import load_script

pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon")


def _row(shape, impl, ms):
    return dict(shape=shape, impl=impl, graph_ms=ms, bench_ms=ms)


def test_summary_picks_the_fastest_variant_of_each_pass():
    gluon_long = load_script("gluon_long")
    rows = [_row("vit_b16_384", name, ms) for name, ms in (
        ("gluon long", 0.26), ("gluon long, early release", 0.25), ("gluon long, 3 groups, early release", 0.20),
        ("gluon long, no RoPE", 0.23), ("gluon long, 3 groups, no RoPE", 0.24),
        ("gluon long training", 0.28), ("gluon long training, 3 groups, early release, swapped tail", 0.21),
        ("sdpa_cudnn (no RoPE)", 0.22), ("timm_compiled", 0.29), ("attnhub", 0.27))] + [
        _row("vit_b16_224", "gluon resident", 0.18), _row("vit_b16_224", "gluon long", 0.21)]
    summary = {(r["shape"], r["kind"]): r for r in gluon_long.summarize(rows)}
    assert set(summary) == {("vit_b16_384", "inference"), ("vit_b16_384", "no RoPE"), ("vit_b16_384", "training"),
                            ("vit_b16_224", "inference")}
    inference = summary["vit_b16_384", "inference"]
    assert inference["best"] == "gluon long, 3 groups, early release" and inference["speedup"] == pytest.approx(1.3)
    assert inference["cudnn_over_best"] == pytest.approx(1.1) and inference["timm_over_best"] == pytest.approx(1.45)
    assert summary["vit_b16_384", "no RoPE"]["best"] == "gluon long, no RoPE"  # the baseline when it is fastest
    assert summary["vit_b16_384", "training"]["best"].startswith("gluon long training, 3 groups")
    assert summary["vit_b16_224", "inference"]["best"] == "gluon long"  # the resident kernel is not a variant
