"""attnhub.bench on the CPU: a tiny custom shape, the CPU-capable implementations, every section, the report's keys
and the plot."""

from __future__ import annotations

import json

import pytest
import yaml

import attnhub
from attnhub import bench

pytest.importorskip("timm")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")
pytest.importorskip("tqdm")

IMPLS = ["attnhub", "attnhub:torch_sdpa", "attnhub:math", "timm_eager"]


def test_main_writes_report_and_plot(tmp_path, capsys):
    out, png, winners = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "measured.yaml"
    argv = ["--device", "cpu", "--shape", "custom:2,2,17,32,1,4", "--impls", ",".join(IMPLS), "--warmup", "1",
            "--rep", "5", "--host-calls", "50", "--no-progress", "--out", str(out), "--plot", str(png),
            "--winners", str(winners)]
    assert bench.main(argv) == 0

    report = json.loads(out.read_text())
    for key in ("date", "environment", "config", "copy_bandwidth_gbs", "shapes", "results", "checks", "first_call",
                "host"):
        assert key in report
    assert set(report["environment"]["versions"]) >= {"attnhub", "torch", "triton", "timm", "python"}
    assert "git_commit" in report["environment"] and "driver" in report["environment"]
    assert report["config"]["impls"] == IMPLS and report["config"]["reference"] == "math, float64"
    assert report["config"]["primary"] == "attnhub"  # the automatic choice
    assert [(r["shape"], r["pass"]) for r in report["results"]] == [("custom_2x2x17x32", p) for p in bench.PASSES]
    for rec in report["results"]:
        assert set(rec["ms"]) == set(IMPLS) and not rec["errors"]
        assert rec["floor_ms"] > 0 and set(rec["pct_of_floor"]) == set(IMPLS)
    checks = report["checks"]["custom_2x2x17x32"]
    for name in IMPLS:  # every one computes RoPE attention: checked against float64 math, o and gradients
        assert checks[name]["ok"] and checks[name]["first_call_s"] > 0
        assert set(checks[name]["rel_l2"]) == {"o", "dq", "dk", "dv"}
        assert all(e < 2e-2 for e in checks[name]["rel_l2"].values())

    first = report["first_call"]
    assert set(first) == {"torch_sdpa", "math"}
    for rec in first.values():
        for label in ("cold", "warm"):
            (row,) = rec[label]
            assert row["shape"] == "custom_2x2x17x32" and row["fwd_s"] > 0 and row["bwd_s"] > 0

    host = report["host"]
    assert set(host["us"]) == {"attnhub:torch_sdpa", "attnhub:math", "sdpa"} and not host["errors"]
    assert all(set(us) == set(bench.PASSES) and min(us.values()) > 0 for us in host["us"].values())
    overhead = host["dispatch_overhead"]
    assert set(overhead) == {"torch_sdpa", "math", "auto", "noop"}
    assert "overhead_us" in overhead["auto"]
    noop = overhead["noop"]
    assert noop["backend"] == "_bench_noop" and noop["attention_us"] > noop["entry_us"] > 0
    assert "_bench_noop" not in attnhub.registry.REGISTRY.specs()  # the temporary backend is gone
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rec in report["results"]:  # the automatic choice against the fastest backend forced
        fastest = min(t for n, t in rec["ms"].items() if n.startswith("attnhub:"))
        assert rec["ratios"]["fastest_backend"] == pytest.approx(rec["ms"]["attnhub"] / fastest)
    rows = yaml.safe_load(winners.read_text())["winners"]  # one row per pass, the faster backend of each
    assert [(r["arch"], r["pass"], r["n_min"], r["n_max"]) for r in rows] == [("cpu", "inference", 0, None),
                                                                              ("cpu", "training", 0, None)]
    for row, rec in zip(rows, report["results"]):
        assert row["backend"] == min(("torch_sdpa", "math"), key=lambda b: rec["ms"][f"attnhub:{b}"])
    printed = capsys.readouterr().out
    assert "ratio vs sdpa_cudnn" in printed and "cold fwd" in printed and "dispatch overhead noop" in printed


def test_failing_impl_is_recorded_not_fatal():
    shape = bench.parse_shape("custom:1,1,5,16,1,2")
    report = bench.run([shape], ("fwd",), ["attnhub:torch_sdpa", "sdpa_cudnn"], sections=("table",), device="cpu",
                       warmup=1, rep=2, progress=False)
    (rec,) = report["results"]
    assert "attnhub:torch_sdpa" in rec["ms"] and "sdpa_cudnn" in rec["errors"]  # no cuDNN attention on the CPU
    assert "first_call" not in report and "host" not in report


def test_wrong_result_is_not_timed(monkeypatch):
    """An implementation whose result is off by more than attnhub.tolerances allows is marked wrong, not timed."""
    real = bench.build

    def build(impl, s, device):
        got = real(impl, s, device)
        if impl == "attnhub:math":
            got.fn = lambda q, k, v, fn=got.fn: fn(q, k, v) * 1.1
        return got

    monkeypatch.setattr(bench, "build", build)
    shape = bench.parse_shape("custom:1,1,5,16,1,2")
    report = bench.run([shape], ("fwd",), ["attnhub:torch_sdpa", "attnhub:math"], sections=("table",),
                       dtype=bench.DTYPES["fp32"], device="cpu", warmup=1, rep=2, progress=False)
    (rec,) = report["results"]
    assert list(rec["ms"]) == ["attnhub:torch_sdpa"] and rec["errors"]["attnhub:math"].startswith("wrong")


def test_usage_errors(capsys):
    for argv in (["--sections", "table,nope"], ["--passes", ""], ["--impls", "attnhub:nope"],
                 ["--sections", "host", "--plot", "x.png"], ["--shape", "vit_h14"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(["--device", "cpu", *argv])
        assert exc.value.code == 2, argv
