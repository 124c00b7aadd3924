"""attnhub.cli (`python -m attnhub {check,info,bench}`) on the CPU: what `check` and `info` print, that `check`
fails (exit 1) when a backend disagrees with the float64 reference or raises, usage errors, and `bench` forwarding.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import attnhub
from attnhub import cli
from attnhub.backends.math import attention as math_attention
from attnhub.registry import REGISTRY

SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$", re.M)


def _parity_rows(out: str) -> dict[str, tuple[str, str]]:
    """backend -> (result, detail) from the parity table of `check`'s output (one dtype on the CPU)."""
    table = out.split("parity against math", 1)[1]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"^  (\w+)\s+(float\w+)\s+(PASS|FAIL|skip)\s*(.*)$", line)
        if m:
            rows[m[1]] = (m[3], m[4])
    return rows


def _expected_choices() -> dict[str, str]:
    """ViT shape name -> the backend `attnhub.explain` picks for it (what `check` must print)."""
    out = {}
    for name, B, H, g, P, D in cli._VIT_SHAPES:
        q = torch.zeros(()).expand(B, H, P + g * g, D)
        out[name] = attnhub.explain(q, q, q, attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P)).chosen
    return out


def test_check_in_process(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out

    assert out.startswith("device: cpu")
    for b in attnhub.list_backends():
        assert re.search(rf"^  {b.name}\s+priority\s+{b.priority}\s+{'available' if b.available else 'unavailable: '}",
                         out, re.M), b
    for shape, chosen in _expected_choices().items():
        assert re.search(rf"^{re.escape(shape)} \(.*\): chosen: {chosen} ", out, re.M), shape
    rows = _parity_rows(out)
    assert set(rows) == set(REGISTRY.specs())
    # every registered backend runs on the CPU (triton_fa_rope through the interpreter) and agrees with math
    assert {r for r, _ in rows.values()} == {"PASS"}, rows
    for result, detail in rows.values():
        assert re.fullmatch(r"o=\S+ dq=\S+ dk=\S+ dv=\S+", detail), detail
    assert SUMMARY.search(out).groups() == (str(len(rows)), "0", "0")


def test_check_subprocess(tmp_path):
    """`python -m attnhub check` as a user types it: TRITON_INTERPRET unset, so it re-runs itself with it set."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "attnhub", "check"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _parity_rows(run.stdout)
    assert rows["triton_fa_rope"][0] == "PASS" and set(rows) == set(REGISTRY.specs())
    assert SUMMARY.search(run.stdout).group(2) == "0"


# Toy backends, each registered next to the real ones (lowest priority, so the ViT choices do not change).
def _wrong_scale(q, k, v, rope, scale):
    return math_attention(q, k, v, rope, scale * 1.5)


def _off_by_5e5(q, k, v, rope, scale):
    """Relative error 5e-5 in o and every gradient: above the float32 bound of attnhub.tolerances (1e-5)."""
    return math_attention(q, k, v, rope, scale) * (1 + 5e-5)


def _raises(q, k, v, rope, scale):
    raise RuntimeError("toy kernel exploded")


def _detached(q, k, v, rope, scale):
    return math_attention(q, k, v, rope, scale).detach()


def _wrong_shape(q, k, v, rope, scale):
    return math_attention(q, k, v, rope, scale)[:, :, :-1]


@pytest.mark.parametrize(
    "impl, fields, result, detail, rc",
    [
        (_wrong_scale, {}, "FAIL", r"o=\S+ dq=", 1),
        (_off_by_5e5, {}, "FAIL", r"o=5\.0e-05 dq=5\.0e-05", 1),  # the tests' bound, not a looser one
        (_raises, {}, "FAIL", "RuntimeError: toy kernel exploded", 1),
        (_detached, {}, "FAIL", "RuntimeError: ", 1),  # no gradient: backward raises
        (_wrong_shape, {}, "FAIL", "o: expected shape", 1),
        (_detached, {"backward": False}, "PASS", r"^o=\S+$", 0),  # forward only, as its registry entry says
        (_raises, {"dtypes": ["float64"]}, "skip", "cannot run this call", 0),  # float32 is not its dtype
    ],
    ids=["wrong-scale", "off-by-5e-5", "raises", "no-grad", "wrong-shape", "forward-only", "not-runnable"],
)
def test_check_reports_a_toy_backend(capsys, impl, fields, result, detail, rc):
    attnhub.register_backend("toy", impl, priority=-10, devices=["cpu"], **fields)

    assert cli.main(["check"]) == rc
    out = capsys.readouterr().out

    rows = _parity_rows(out)
    assert rows["toy"][0] == result and re.search(detail, rows["toy"][1]), rows["toy"]
    assert {r for n, (r, _) in rows.items() if n != "toy"} == {"PASS"}
    assert SUMMARY.search(out).group(2) == str(rc)


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    import importlib.metadata as md

    assert out.startswith("device: cpu")
    assert f"torch {md.version('torch')}" in out and f"attnhub {attnhub.__version__}" in out
    for b in attnhub.list_backends():
        state = "available" if b.available else f"unavailable: {b.why_not}"
        assert f"{b.name:<16} priority {b.priority:>4}  {state}" in out
        assert b.description in out
    assert "parity" not in out  # info does not run anything


@pytest.mark.parametrize(
    "argv, message",
    [(["bogus"], "invalid choice: 'bogus'"), ([], "required: command"), (["info", "--bogus"], "unrecognized")],
    ids=["unknown-command", "no-command", "extra-argument"],
)
def test_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m attnhub") and message in err


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m attnhub bench")
    for option in ("--shape", "--impls", "--device", "--rep", "--out", "--plot"):
        assert option in out


def test_bench_forwards_remaining_arguments(monkeypatch):
    from attnhub import bench

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv))  # returns None: success
    argv = ["--device", "cpu", "--shape", "custom:1,1,5,16,1,2", "--rep", "3"]
    assert cli.main(["bench", *argv]) == 0
    assert seen == [argv]
    monkeypatch.setattr(bench, "main", lambda argv: 3)
    assert cli.main(["bench"]) == 3
