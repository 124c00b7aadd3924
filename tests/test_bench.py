"""attnhub.bench on the CPU: a tiny custom shape, the CPU-capable implementations, the report's keys and the plot."""

from __future__ import annotations

import json

import pytest

import attnhub

from attnhub import bench

pytest.importorskip("timm")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")
pytest.importorskip("tqdm")

IMPLS = ["attnhub:torch_sdpa", "attnhub:math", "timm_eager"]


def test_main_writes_report_and_plot(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    argv = ["--device", "cpu", "--shape", "custom:2,2,17,32,1,4", "--impls", ",".join(IMPLS), "--warmup", "1",
            "--rep", "5", "--overhead-calls", "50", "--no-progress", "--out", str(out), "--plot", str(png)]
    assert bench.main(argv) == 0

    report = json.loads(out.read_text())
    for key in ("date", "environment", "config", "copy_bandwidth_gbs", "shapes", "results", "checks",
                "dispatch_overhead_us"):
        assert key in report
    assert set(report["environment"]["versions"]) >= {"attnhub", "torch", "triton", "timm"}
    assert report["config"]["impls"] == IMPLS and report["config"]["reference"] == "timm_eager"
    assert [(r["shape"], r["pass"]) for r in report["results"]] == [("custom_2x2x17x32", p) for p in bench.PASSES]
    for rec in report["results"]:
        assert set(rec["ms"]) == set(IMPLS) and not rec["errors"]
        assert rec["floor_ms"] > 0 and set(rec["pct_of_floor"]) == set(IMPLS)
    checks = report["checks"]["custom_2x2x17x32"]
    for name in ("attnhub:torch_sdpa", "attnhub:math"):
        assert checks[name]["ok"] and checks[name]["rel_l2"]["o"] < 2e-2 and checks[name]["first_call_s"] > 0
    assert set(report["dispatch_overhead_us"]) == {"torch_sdpa", "math", "auto", "noop"}
    assert "overhead_us" in report["dispatch_overhead_us"]["auto"]
    noop = report["dispatch_overhead_us"]["noop"]
    assert noop["backend"] == "_bench_noop" and noop["attention_us"] > noop["entry_us"] > 0
    assert "_bench_noop" not in attnhub.registry.REGISTRY.specs()  # the temporary backend is gone
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratio vs sdpa_cudnn" in capsys.readouterr().out


def test_failing_impl_is_recorded_not_fatal():
    shape = bench.parse_shape("custom:1,1,5,16,1,2")
    report = bench.run([shape], ("fwd",), ["attnhub:torch_sdpa", "sdpa_cudnn"], device="cpu", warmup=1, rep=2,
                       overhead_calls=10, progress=False)
    (rec,) = report["results"]
    assert "attnhub:torch_sdpa" in rec["ms"] and "sdpa_cudnn" in rec["errors"]  # no cuDNN attention on the CPU


def test_parse_shape():
    assert bench.parse_shape("vit_b16_512_reg4") == bench.Shape("vit_b16_512_reg4", 32, 12, 1029, 64, 5, 32)
    assert bench.parse_shape("custom:2,2,17,32,1,4").N == 17
    with pytest.raises(ValueError, match="P \\+ grid"):
        bench.parse_shape("custom:2,2,18,32,1,4")
    with pytest.raises(ValueError, match="unknown shape"):
        bench.parse_shape("vit_h14")
