"""benchmarks/sweep.py on the CPU (Triton interpreter): two values of one config field, through the public
`configs.override`, checked and timed; values parsed; the table printed."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_script

pytest.importorskip("triton")
pytest.importorskip("attnhub.backends.triton_fa_rope.configs")


def _load():
    return load_script("sweep")


def test_parse_value():
    sweep = _load()
    assert sweep.parse_value("128,64,4,3") == sweep.configs.KernelConfig(128, 64, 4, 3)
    assert [sweep.parse_value(v) for v in ("none", "True", "384")] == [None, True, 384]


def test_sweep_cpu(tmp_path, capsys):
    sweep = _load()
    out = tmp_path / "sweep.json"
    argv = ["--device", "cpu", "--dtype", "fp32", "--field", "fwd", "--values", "32,32,1,1 16,16,1,1",
            "--set", "narrow_tail=true", "--shape", "custom:1,1,5,16,1,2", "--passes", "fwd", "--warmup", "1",
            "--rep", "1", "--out", str(out)]
    assert sweep.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["config"]["set"] == {"narrow_tail": True}
    assert [r["value"] for r in report["rows"]] == [[32, 32, 1, 1, None], [16, 16, 1, 1, None]]  # maxnreg last
    for row in report["rows"]:
        assert row["ok"] and row["ms"]["fwd"] > 0 and set(row["rel_l2"]) == {"o", "dq", "dk", "dv"}
    assert "custom_1x1x5x16: fwd" in capsys.readouterr().out


def test_unknown_field_of_set_is_a_usage_error():
    sweep = _load()
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--device", "cpu", "--field", "fwd", "--values", "32,32,1,1", "--set", "nope=1",
                    "--shape", "custom:1,1,5,16,1,2"])
    assert exc.value.code == 2
