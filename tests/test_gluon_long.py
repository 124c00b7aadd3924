"""benchmarks/gluon_long.py's summary on the CPU (the script itself needs a Hopper GPU): per shape and pass, the long
kernel's baseline (one attending partition) against its fastest variant."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import Shape, load_script, make_qkv, make_table, plan_as_compiled

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


def test_past_640_tokens_the_streaming_kernel_is_summarized_against_the_triton_forward():
    """At 1029 tokens: inference against the Triton forward, training against the Triton training forward (forced:
    the table takes the streaming kernel there); the no-RoPE row has no baseline; the long kernel's baselines are
    not looked for, nor is the table's choice (attnhub:triton_fa_rope) a baseline."""
    gluon_long = load_script("gluon_long")
    rows = [_row("vit_b16_512_reg4", name, ms) for name, ms in (
        ("gluon stream", 0.30), ("gluon stream, no RoPE", 0.27), ("gluon stream training", 0.33),
        ("triton training", 0.44), ("triton forward", 0.36), ("attnhub:triton_fa_rope", 0.29), ("attnhub", 0.29),
        ("sdpa_cudnn (no RoPE)", 0.33), ("timm_compiled", 0.39))]
    summary = {r["kind"]: r for r in gluon_long.summarize(rows)}
    assert set(summary) == {"inference", "training"}
    assert summary["inference"]["best"] == "gluon stream" and summary["inference"]["speedup"] == pytest.approx(1.2)
    assert summary["inference"]["timm_over_best"] == pytest.approx(1.3)
    assert summary["training"]["best"] == "gluon stream training" and summary["training"]["baseline_ms"] == 0.44
    slower = [_row("n785", "gluon stream", 0.40), _row("n785", "triton forward", 0.35)]
    assert gluon_long.summarize(slower)[0]["best"] == "triton forward"  # the baseline when it is fastest


def test_the_ring_depths_are_variants_of_the_streaming_kernel():
    """`--v-slots`: rows "gluon stream, 5 V slots" compete with the table's depth in their pass."""
    gluon_long = load_script("gluon_long")
    rows = [_row("n1029", name, ms) for name, ms in (
        ("gluon stream", 0.30), ("gluon stream, 5 V slots", 0.29), ("gluon stream training", 0.33),
        ("gluon stream training, 5 V slots", 0.34), ("triton training", 0.44), ("triton forward", 0.36))]
    summary = {r["kind"]: r["best"] for r in gluon_long.summarize(rows)}
    assert summary == {"inference": "gluon stream, 5 V slots", "training": "gluon stream training"}


def test_the_overlapped_key_loop_is_a_variant_of_the_streaming_kernel():
    """`--overlap`: rows "gluon stream, overlapped" (", no RoPE" last) compete in their own pass."""
    gluon_long = load_script("gluon_long")
    rows = [_row("n1029", name, ms) for name, ms in (
        ("gluon stream", 0.30), ("gluon stream, overlapped", 0.27), ("gluon stream training", 0.33),
        ("gluon stream training, overlapped", 0.35), ("gluon stream, no RoPE", 0.26),
        ("gluon stream, overlapped, no RoPE", 0.24), ("triton training", 0.44), ("triton forward", 0.36))]
    summary = {r["kind"]: r["best"] for r in gluon_long.summarize(rows)}
    assert summary == {"inference": "gluon stream, overlapped", "training": "gluon stream training"}


def test_clipped_stores_give_the_training_plan_one_heads_buffer_for_the_rotated_q_and_k(monkeypatch):
    """`--clipped-stores`: within the context a training call's plan makes its rotated q and k descriptors over one
    head's buffer ([1, N, 1, D] as TMA reads it: every other head's boxes clipped), with the plan's block shapes;
    after it the plan's own makers again; the ablation's rows are no pass's variants."""
    from attnhub.backends.triton_fa_rope import launch
    from attnhub.backends.triton_fa_rope.configs import GluonOptions

    plan_as_compiled(monkeypatch)
    gluon_long, gluon_fwd = load_script("gluon_long"), launch._gluon("gluon_fwd")
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_qkv("fused", 2, 3, 577, 64, torch.bfloat16, gen)
    table = make_table(Shape(2, 3, (24, 24), 1, 64, "interleaved"), gen)
    options = GluonOptions(True, 257, 3)
    swapped = gluon_long._stores_clipped(q, k, v, table, options)
    plan = gluon_fwd._plan(q, k, v, table, gluon_fwd._tables(table, q.dtype)[0], True, options)
    full = torch.empty(q.shape, dtype=q.dtype)
    own = [make(full) for make in plan.make_rot]
    assert [list(d.shape) for d in own] == [[2, 577, 3, 64]] * 2
    with swapped():
        inside = [make(full) for make in plan.make_rot]
    assert [list(d.shape) for d in inside] == [[1, 577, 1, 64]] * 2
    assert [d.block_shape for d in inside] == [d.block_shape for d in own]
    assert inside[0].base is inside[1].base and inside[0].base is not full
    assert [list(make(full).shape) for make in plan.make_rot] == [[2, 577, 3, 64]] * 2
    rows = [_row("vit_b16_384", name, ms) for name, ms in (
        ("gluon long training", 0.28), ("gluon long training, 3 groups, early release", 0.25),
        ("gluon long training, 3 groups, early release" + gluon_long.CLIPPED, 0.22))]
    (training,) = gluon_long.summarize(rows)
    assert training["best"] == "gluon long training, 3 groups, early release"
