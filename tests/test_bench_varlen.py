"""benchmarks/bench_varlen.py on the CPU: both cases, attnhub and timm's math, the report and its error check."""

from __future__ import annotations

import json

import pytest
import torch

import attnhub

from tests.helpers import load_script

pytest.importorskip("timm")


def test_smoke_cpu(tmp_path, capsys):
    bench = load_script("bench_varlen")
    out = tmp_path / "varlen.json"
    argv = ["--device", "cpu", "--batch", "2", "--rep", "1", "--warmup", "1", "--impls", "attnhub,timm_eager",
            "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert [(r["case"], r["impl"]) for r in report["records"]] == [
        (c, i) for c in ("naflex", "gqa") for i in ("attnhub", "timm_eager")]
    for rec in report["records"]:
        assert "error" not in rec, rec
        assert max(rec["rel_l2"].values()) < 2e-2  # bf16 against float64 math, valid query rows
        assert rec["ms"]["fwd"] > 0 and rec["ms"]["fwdbwd"] > 0
    assert set(report["ratios_timm_compiled_over_attnhub"]) == set()  # timm_compiled not run
    assert "naflex" in capsys.readouterr().out


def test_error_check_catches_an_unmasked_attention(monkeypatch):
    """The check compares against float64 math with the key padding: attention that ignores the mask fails it."""
    bench = load_script("bench_varlen")
    case = bench.make_case("naflex", 2, torch.device("cpu"), torch.bfloat16)
    assert max(bench.errors("attnhub", case).values()) < 2e-2
    real = bench.training
    monkeypatch.setattr(bench, "training", lambda impl, c: real(impl, c) if impl != "attnhub" else (
        lambda views, packed: attnhub.attention(*views(), rope=c["table"])))  # the reference still masks
    assert max(bench.errors("attnhub", case).values()) > 5e-2


def test_set_applies_config_fields_to_the_whole_run(tmp_path, monkeypatch):
    """--set FIELD=VALUE (as sweep.py reads it) holds `configs.override` around every measurement and is recorded;
    with --winners it is a usage error (the winners would come from a table the package does not ship)."""
    from attnhub.backends.triton_fa_rope import configs

    bench = load_script("bench_varlen")
    seen = []
    monkeypatch.setattr(bench, "measure", lambda impl, case, device, warmup, rep: seen.append(
        configs.for_call(device, 64).prerotate_q_from_n) or {"impl": impl, "error": "not measured"})
    out = tmp_path / "varlen.json"
    argv = ["--device", "cpu", "--batch", "2", "--cases", "naflex", "--impls", "attnhub", "--set",
            "prerotate_q_from_n=384", "--out", str(out)]
    assert bench.main(argv) == 0
    assert seen == [384] and configs.for_call(torch.device("cpu"), 64).prerotate_q_from_n != 384
    assert json.loads(out.read_text())["config"]["set"] == {"prerotate_q_from_n": 384}
    with pytest.raises(SystemExit):
        bench.main([*argv, "--winners", str(tmp_path / "measured.yaml")])
