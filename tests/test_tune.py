"""attnhub.tune on the CPU: measurement picks an eligible backend, persists it in $ATTNHUB_CACHE_DIR/tune.json
keyed by device name and versions, a new process starts with it, a corrupt file is ignored with a warning naming
it, and a registry change invalidates a record. Tiny shapes: q, k, v: [1, 2, 5, 16] with a 2x2 grid + 1 prefix.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import attnhub
from attnhub import _tuning as tune
from attnhub import select
from attnhub.backends.math import attention as math_attention
from tests.helpers import assert_close_rel


B, H, GRID, P, D = 1, 2, (2, 2), 1, 16
N = P + GRID[0] * GRID[1]


@pytest.fixture(autouse=True)
def _fresh_tune_state(monkeypatch):
    """No results in memory from earlier tests: each test reads its own (empty) cache folder."""
    monkeypatch.setattr(tune, "_results", None)
    monkeypatch.setattr(tune, "_results_path", None)
    select.clear_cache()
    yield
    select.clear_cache()


def _inputs(seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g).requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, attnhub.CosSinTable(grid=GRID, head_dim=D, prefix_tokens=P)


def _eligible(q, k, v, rope) -> set[str]:
    return {name for name, why in attnhub.explain(q, k, v, rope).reasons.items() if not why}


def _tune_file():
    return tune._path()


def _forget_in_memory(monkeypatch, results=None):
    """As a new process would start: nothing loaded (or `results`), nothing cached."""
    monkeypatch.setattr(tune, "_results", results)
    monkeypatch.setattr(tune, "_results_path", None)
    select.clear_cache()


def test_tune_picks_an_eligible_backend_and_persists_it():
    q, k, v, rope = _inputs()
    eligible = _eligible(q, k, v, rope)
    assert len(eligible) >= 2, f"nothing to choose between on this machine: {eligible}"

    best = attnhub.tune(q, k, v, rope)

    assert best in eligible
    ex = attnhub.explain(q, k, v, rope)
    assert (ex.chosen, ex.how) == (best, "measured")
    assert "fastest when measured" in str(ex)
    assert attnhub.explain(q, k, v, rope, backend="math").how == "forced"
    assert attnhub.explain(q.double(), k.double(), v.double(), rope).how == "priority"  # another decision key

    path = _tune_file()
    assert str(path.parent) == os.environ["ATTNHUB_CACHE_DIR"]
    data = json.loads(path.read_text())
    (env,) = data  # one environment: this device and these versions
    assert env.startswith("cpu:")
    for pkg in ("attnhub", "torch", "triton"):
        assert f"{pkg}={md.version(pkg)}" in env.split("|")
    ((key, chosen),) = data[env].items()
    assert chosen == best
    assert set(json.loads(key)["candidates"]) == eligible


def test_tune_under_autocast_keys_the_autocast_dtype():
    """`tune` inside autocast records the decision `attention` looks up there (inputs cast to the autocast dtype)."""
    q, k, v, rope = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        best = attnhub.tune(q, k, v, rope)
        why = attnhub.explain(q, k, v, rope)
    assert why.chosen == best and why.how == "measured"
    assert attnhub.explain(q, k, v, rope).how == "priority"  # float32 outside autocast: another key


def _slow_math(q, k, v, rope, scale):
    time.sleep(0.003)
    return math_attention(q, k, v, rope, scale)


def test_measurement_beats_priority(monkeypatch):
    """A backend that wins on priority but sleeps in every call must lose the measurement."""
    attnhub.register_backend("slow", _slow_math, priority=1000, devices=["cpu"])
    q, k, v, rope = _inputs()
    assert attnhub.explain(q, k, v, rope).chosen == "slow"  # static choice

    monkeypatch.setenv("ATTNHUB_TUNE", "1")
    o = attnhub.attention(q, k, v, rope)

    ex = attnhub.explain(q, k, v, rope)
    assert ex.how == "measured" and ex.chosen in _eligible(q, k, v, rope) - {"slow"}
    ref = math_attention(q.double(), k.double(), v.double(), rope, D**-0.5)
    assert_close_rel(o, ref, torch.float32, "o after measuring")


def test_env_var_measures_on_first_call_with_grad(monkeypatch):
    """ATTNHUB_TUNE=1: the first call of a new key measures (forward + backward here) and gives correct grads."""
    monkeypatch.setenv("ATTNHUB_TUNE", "1")
    q, k, v, rope = _inputs(seed=1, requires_grad=True)
    do = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(2))

    o = attnhub.attention(q, k, v, rope)
    o.backward(do)

    (records,) = json.loads(_tune_file().read_text()).values()
    ((key, chosen),) = records.items()
    assert json.loads(key)["needs_grad"] is True and chosen in _eligible(q, k, v, rope)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = math_attention(q64, k64, v64, rope, D**-0.5)
    ref.backward(do.double())
    for what, got, want in (("o", o, ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                            ("dv", v.grad, v64.grad)):
        assert_close_rel(got, want, torch.float32, what)


_NEW_PROCESS = textwrap.dedent(
    """
    import json, torch, attnhub, attnhub._tuning

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again instead of reading tune.json")

    attnhub._tuning.measure = no_measuring
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn({B}, {H}, {N}, {D}, generator=g) for _ in range(3))
    rope = attnhub.CosSinTable(grid={GRID}, head_dim={D}, prefix_tokens={P})
    ex = attnhub.explain(q, k, v, rope)
    o = attnhub.attention(q, k, v, rope)
    print(json.dumps({{"chosen": ex.chosen, "how": ex.how, "finite": bool(torch.isfinite(o).all())}}))
    """
).format(B=B, H=H, N=N, D=D, GRID=GRID, P=P)


def test_new_process_starts_with_the_measured_choice(tmp_path):
    q, k, v, rope = _inputs()
    best = attnhub.tune(q, k, v, rope)
    # Record the other eligible backend as the winner: the new process must report what the file says,
    # which it can only know by reading it (measuring is disabled there).
    other = sorted(_eligible(q, k, v, rope) - {best})[0]
    path = _tune_file()
    data = json.loads(path.read_text())
    (records,) = data.values()
    (key,) = records
    records[key] = other
    path.write_text(json.dumps(data))

    env = {**os.environ, "ATTNHUB_TUNE": "1", "ATTNHUB_CACHE_DIR": str(path.parent)}
    run = subprocess.run([sys.executable, "-c", _NEW_PROCESS], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"chosen": other, "how": "measured", "finite": True}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"env": 3}'], ids=["syntax", "list", "env-not-dict"])
def test_corrupt_file_is_ignored_with_a_warning_naming_it(monkeypatch, caplog, content):
    path = _tune_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    monkeypatch.setenv("ATTNHUB_TUNE", "1")
    q, k, v, rope = _inputs()

    with caplog.at_level(logging.WARNING, logger="attnhub.tune"):
        o = attnhub.attention(q, k, v, rope)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "corrupt" in warnings[0]
    assert torch.isfinite(o).all()
    (records,) = json.loads(path.read_text()).values()  # rewritten, valid, with the new measurement
    assert list(records.values()) == [attnhub.explain(q, k, v, rope).chosen]


def _other_math(q, k, v, rope, scale):
    return math_attention(q, k, v, rope, scale)


@pytest.mark.parametrize("change", ["new-backend", "repointed-impl"])
def test_registry_change_invalidates(monkeypatch, change):
    q, k, v, rope = _inputs()
    attnhub.tune(q, k, v, rope)
    assert attnhub.explain(q, k, v, rope).how == "measured"

    if change == "new-backend":  # one more eligible backend: the old measurement never timed it
        attnhub.register_backend("other", _other_math, priority=-5, devices=["cpu"])
    else:  # same name, another implementation
        attnhub.register_backend("math", _other_math, priority=0)
    assert attnhub.explain(q, k, v, rope).how == "priority"
    _forget_in_memory(monkeypatch)  # and likewise in a new process reading the file
    monkeypatch.setenv("ATTNHUB_TUNE", "1")
    assert attnhub.explain(q, k, v, rope).how == "priority"

    attnhub.attention(q, k, v, rope)  # measures again, among the new candidates

    (records,) = json.loads(_tune_file().read_text()).values()
    changed = "other" if change == "new-backend" else "math"
    new = [c for c in (json.loads(key)["candidates"] for key in records) if c.get(changed, "").endswith("_other_math")]
    assert len(records) == 2 and len(new) == 1  # the stale record stays in the file, unused
    assert set(new[0]) == _eligible(q, k, v, rope)
    assert attnhub.explain(q, k, v, rope).how == "measured"


def test_record_of_another_environment_is_not_used(monkeypatch):
    q, k, v, rope = _inputs()
    attnhub.tune(q, k, v, rope)
    path = _tune_file()
    data = json.loads(path.read_text())
    (env,) = data
    path.write_text(json.dumps({env.replace("torch=", "torch=0.0.0-"): data[env]}))

    # as after an explicit attnhub.tune() in this process: results loaded, so lookups consult the file
    _forget_in_memory(monkeypatch, results={})
    assert attnhub.explain(q, k, v, rope).how == "priority"
