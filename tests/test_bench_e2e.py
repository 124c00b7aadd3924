"""benchmarks/bench_e2e.py on the CPU: one tiny run of every mode and variant, the report's keys and the table."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from tests.helpers import load_script

pytest.importorskip("timm")

def _load():
    return load_script("bench_e2e")


def test_smoke_cpu(tmp_path, capsys):
    bench_e2e = _load()
    out = tmp_path / "e2e.json"
    argv = ["--device", "cpu", "--batch", "2", "--img", "64", "--rep", "5", "--warmup", "1", "--depth", "1",
            "--models", "vit_small_patch16_rope_224", "--compile-backend", "eager", "--out", str(out)]
    assert bench_e2e.main(argv) == 0

    report = json.loads(out.read_text())
    assert set(report) >= {"date", "environment", "config", "checks", "records", "ratios"}
    assert set(report["environment"]["versions"]) >= {"attnhub", "torch", "triton", "timm"}
    assert report["config"]["compile"] == {"mode": "default", "fullgraph": False, "backend": "eager"}
    (chk,) = report["checks"]
    assert chk["logits_rel_l2"] < 2e-2 and chk["qkv_grad_rel_l2"] < 2e-2  # bf16 autocast, CPU
    keys = [(r["mode"], r["variant"], r["compiled"]) for r in report["records"]]
    assert sorted(keys) == sorted((m, v, c) for m in ("train", "infer") for v in ("timm", "attnhub")
                                  for c in (False, True))
    for rec in report["records"]:
        assert "error" not in rec and rec["ms"] > 0 and rec["img_per_s"] > 0
        assert ("graph_breaks" in rec) == rec["compiled"]
        events = rec["host_events_per_step"]  # CPU: no allocator counts
        assert set(events) == {"gc_collections", "gc_pause_ms"} and len(events["gc_collections"]) == 3
        if rec["variant"] == "attnhub" and not rec["compiled"]:
            assert rec["attnhub_explain"].startswith("chosen: torch_sdpa")
    for row in report["ratios"]:
        assert row["attnhub_eager_vs_timm_eager"] > 0 and row["attnhub_compiled_vs_timm_compiled"] > 0
    assert "attnhub vs timm: eager" in capsys.readouterr().out


def test_ratios_pair_eager_with_eager_and_compiled_with_compiled():
    bench_e2e = _load()
    rec = lambda variant, compiled, ms: dict(model="m", mode="train", variant=variant, compiled=compiled, ms=ms)  # noqa: E731
    rows = bench_e2e.ratios([rec("timm", False, 30.0), rec("attnhub", False, 20.0), rec("timm", True, 12.0),
                             {**rec("attnhub", True, None), "error": "boom"}])
    assert rows == [{"model": "m", "mode": "train", "attnhub_eager_vs_timm_eager": 1.5,
                     "attnhub_compiled_vs_timm_compiled": None}]


@pytest.mark.parametrize("model, kwargs", [
    ("naflexvit_base_patch16_gap", '{"rope_type": "axial", "embed_dim": 64, "num_heads": 2}'),
    ("vit_small_patch16_rope_224", '{"attn_type": "rope", "num_kv_heads": 2, "qkv_fused": false}'),
], ids=["naflex", "gqa"])
def test_smoke_cpu_naflex_and_grouped_heads(tmp_path, model, kwargs):
    """A NaFlex batch (mixed grids, padding) and grouped k/v heads run through the same harness and checks."""
    bench_e2e = _load()
    out = tmp_path / "e2e.json"
    argv = ["--device", "cpu", "--batch", "4", "--img", "64", "--seq-len", "64", "--rep", "3", "--warmup", "1",
            "--depth", "1", "--models", model, "--model-kwargs", kwargs, "--modes", "train", "--no-compile",
            "--out", str(out)]
    assert bench_e2e.main(argv) == 0
    report = json.loads(out.read_text())
    (chk,) = report["checks"]
    assert chk["logits_rel_l2"] < 2e-2 and chk["qkv_grad_rel_l2"] < 2e-2, chk
    assert all("error" not in r and r["ms"] > 0 for r in report["records"])


def test_compile_only_with_gc_freeze(tmp_path):
    """--compile-only times the compiled variants alone; --gc-freeze is recorded and leaves nothing frozen."""
    bench_e2e = _load()
    out = tmp_path / "e2e.json"
    argv = ["--device", "cpu", "--batch", "2", "--img", "64", "--rep", "3", "--warmup", "1", "--depth", "1",
            "--models", "vit_small_patch16_rope_224", "--modes", "train", "--compile-backend", "eager",
            "--compile-only", "--gc-freeze", "--out", str(out)]
    assert bench_e2e.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["config"]["gc_freeze"] is True
    assert [(r["variant"], r["compiled"]) for r in report["records"]] == [("timm", True), ("attnhub", True)]
    assert all("error" not in r for r in report["records"])
    assert gc.get_freeze_count() == 0


def test_rounds_alternate_the_variants(tmp_path, monkeypatch):
    """--rounds 3: both variants built once, timed in alternating order (timm, attnhub / attnhub, timm / ...);
    each ms is the median of its rounds, and the ratios carry each round's."""
    bench_e2e = _load()
    fake = iter([10.0, 5.0, 6.0, 12.0, 11.0, 4.0])  # timm 10, 12, 11; attnhub 5, 6, 4

    def time_ms(fn, **kw):
        fn()
        return next(fake)

    timed = []
    real_time = bench_e2e.Variant.time
    monkeypatch.setattr(bench_e2e.Variant, "time", lambda self: (timed.append(self.rec["variant"]), real_time(self)))
    monkeypatch.setattr(bench_e2e.benchkit, "time_ms", time_ms)
    built = []
    real_build = bench_e2e.build
    monkeypatch.setattr(bench_e2e, "build", lambda *a, **kw: (built.append(a[1]), real_build(*a, **kw))[1])
    out = tmp_path / "e2e.json"
    argv = ["--device", "cpu", "--batch", "2", "--img", "64", "--depth", "1", "--models", "vit_small_patch16_rope_224",
            "--modes", "train", "--no-compile", "--rounds", "3", "--out", str(out)]
    assert bench_e2e.main(argv) == 0
    assert timed == ["timm", "attnhub", "attnhub", "timm", "timm", "attnhub"]
    assert built == ["timm", "attnhub"] * 2  # the check's models, then each variant's once for all rounds
    report = json.loads(out.read_text())
    assert report["config"]["rounds"] == 3
    timm_rec, ours = report["records"]
    assert timm_rec["round_ms"] == [10.0, 12.0, 11.0] and timm_rec["ms"] == 11.0
    assert ours["round_ms"] == [5.0, 6.0, 4.0] and ours["ms"] == 5.0
    (row,) = report["ratios"]
    assert row["attnhub_eager_vs_timm_eager"] == 11.0 / 5.0
    assert row["attnhub_eager_vs_timm_eager_rounds"] == [2.0, 2.0, 11.0 / 4.0]
    with pytest.raises(SystemExit, match="--rounds"):
        bench_e2e.main([*argv[:-4], "--rounds", "0"])


def test_host_events_count_garbage_collections():
    bench_e2e = _load()
    with bench_e2e.host_events(torch.device("cpu")) as events:
        gc.collect(1)
        gc.collect(2)
    assert events["gc_collections"] == [0, 1, 1] and events["gc_pause_ms"] > 0
    assert bench_e2e._per_step({"gc_collections": [4, 2, 0], "gc_pause_ms": 3.0}, 4) == {
        "gc_collections": [1.0, 0.5, 0.0], "gc_pause_ms": 0.75}


def test_naflex_batch_pads_like_the_collator():
    batch = _load().naflex_batch(8, 576)
    valid = batch["patch_valid"]
    padding = 1 - valid.float().mean(1)
    assert ((padding >= 0.1) & (padding <= 0.4)).all(), padding
    assert len({int(n) for n in valid.sum(1)}) >= 3  # several grid shapes
    for b in range(8):  # valid patches: a row-major prefix of the sample's grid
        n = int(valid[b].sum())
        assert valid[b, :n].all() and not valid[b, n:].any()
        ys, xs = batch["patch_coord"][b, :n].T
        assert (ys * (xs.max() + 1) + xs).tolist() == list(range(n))
