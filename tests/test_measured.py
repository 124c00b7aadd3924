"""The shipped measured winners (attnhub/_measured.py): rows from benchmark results, and selection by them."""

from __future__ import annotations

import pytest
import torch
import yaml

import attnhub
from attnhub import _measured, select, settings


def _qkv(n: int, grad: bool):
    table = attnhub.CosSinTable(grid=(1, n - 1), head_dim=32, prefix_tokens=1)
    q, k, v = (torch.randn(1, 2, n, 32, requires_grad=grad) for _ in "qkv")
    return q, k, v, table


def _result(shape, n, backend, ms, pass_="fwd+bwd"):
    return dict(shape=shape, n=n, head_dim=32, dtype="float32", backend=backend, ms=ms, **{"pass": pass_})


def test_winners_split_lengths_at_geometric_midpoints_and_average_shapes():
    results = [
        _result("a", 16, "math", 1.0), _result("a", 16, "torch_sdpa", 2.0),
        _result("b", 16, "math", 1.0), _result("b", 16, "torch_sdpa", 0.9),  # mean ratio: math 1.05, sdpa 1.5
        _result("c", 64, "math", 3.0), _result("c", 64, "torch_sdpa", 2.0),
        _result("c", 64, "math", 1.0, "fwd"), _result("c", 64, "torch_sdpa", 2.0, "fwd"),
    ]
    rows = _measured.winners(results, "cpu", "test machine")
    got = {(r["pass"], r["n_min"], r["n_max"]): r["backend"] for r in rows}
    assert got == {("training", 0, 32): "math", ("training", 32, None): "torch_sdpa", ("inference", 0, None): "math"}
    first = next(r for r in rows if (r["pass"], r["n_min"]) == ("training", 0))
    assert first["measured"] == "N=16 on test machine, ms: a: math 1.000, torch_sdpa 2.000; b: torch_sdpa 0.900, math 1.000"


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_selection_follows_the_table_and_explains_it(tmp_path, grad):
    results = [_result("s", 17, "math", 1.0, "fwd+bwd" if grad else "fwd"), _result("s", 17, "torch_sdpa", 2.0,
                                                                                   "fwd+bwd" if grad else "fwd")]
    path = tmp_path / "measured.yaml"
    path.write_text(_measured.dump(_measured.winners(results, "cpu", "test machine"), "a test"))
    q, k, v, table = _qkv(17, grad)
    assert attnhub.explain(q, k, v, table).chosen == "torch_sdpa"  # priority, without the table
    with settings.override(measured=str(path)):
        select.clear_cache()
        how = attnhub.explain(q, k, v, table)
        assert (how.chosen, how.how) == ("math", "table")
        assert "measured: N=17 on test machine" in str(how)
        seen = []
        attnhub.register_backend("math", lambda *a: seen.append(1) or torch.zeros_like(a[0]), priority=0)
        attnhub.attention(q, k, v, table)
        assert seen  # the call ran the table's winner
        q2, k2, v2, table2 = _qkv(9, not grad)  # the other pass: no row applies
        assert attnhub.explain(q2, k2, v2, table2).how == "priority"
    select.clear_cache()


def test_a_winner_that_cannot_run_the_call_leaves_priorities_in_charge(tmp_path):
    path = tmp_path / "measured.yaml"
    path.write_text(_measured.dump([dict(arch="cpu", dtype="float32", head_dim=32, **{"pass": "inference"},
                                         n_min=0, n_max=None, backend="triton_rope_sdpa", measured="x")], "a test"))
    q, k, v, table = _qkv(17, False)
    with settings.override(measured=str(path)):
        select.clear_cache()
        assert attnhub.explain(q, k, v, table).how == "priority"
    select.clear_cache()


def test_a_malformed_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("winners:\n  - {arch: cpu, dtype: float32}\n")
    q, k, v, table = _qkv(17, False)
    with settings.override(measured=str(path)), pytest.raises(ValueError, match="bad.yaml: winners\\[0\\]"):
        select.clear_cache()
        attnhub.explain(q, k, v, table)
    select.clear_cache()


def test_clear_cache_reads_an_edited_file_again(tmp_path):
    """select.clear_cache (what settings' docs say to call after a change) re-reads the file, also at the same path."""
    path = tmp_path / "measured.yaml"
    row = dict(arch="cpu", dtype="float32", head_dim=32, n_min=0, n_max=None, measured="x", **{"pass": "inference"})
    q, k, v, table = _qkv(17, False)
    with settings.override(measured=str(path)):
        path.write_text(_measured.dump([{**row, "backend": "math"}], "a test"))
        select.clear_cache()
        assert attnhub.explain(q, k, v, table).chosen == "math"
        path.write_text(_measured.dump([{**row, "backend": "torch_sdpa"}], "a test"))
        select.clear_cache()
        assert attnhub.explain(q, k, v, table).chosen == "torch_sdpa"
    select.clear_cache()


def test_rows_apply_to_their_class_of_inputs(tmp_path):
    """A key_padding row decides masked calls only, a gqa row grouped-head calls only, a plain row neither."""
    row = dict(arch="cpu", dtype="float32", head_dim=32, n_min=0, n_max=None, measured="x", **{"pass": "inference"})
    path = tmp_path / "measured.yaml"
    path.write_text(_measured.dump([{**row, "backend": "math", "inputs": "key_padding"},
                                    {**row, "backend": "math", "inputs": "gqa"}], "a test"))
    q, k, v, table = _qkv(17, False)
    mask = torch.ones(1, 17, dtype=torch.bool)
    with settings.override(measured=str(path)):
        select.clear_cache()
        assert attnhub.explain(q, k, v, table).how == "priority"  # plain call: no plain row
        how = attnhub.explain(q, k, v, table, key_padding_mask=mask)
        assert (how.chosen, how.how) == ("math", "table")
        assert attnhub.explain(q, k[:, :1], v[:, :1], table).how == "table"  # 2 query heads, 1 k/v head
        path.write_text(_measured.dump([{**row, "backend": "math"}], "a test"))
        select.clear_cache()
        assert attnhub.explain(q, k, v, table).how == "table"
        assert attnhub.explain(q, k, v, table, key_padding_mask=mask).how == "priority"
    select.clear_cache()


def test_merge_keeps_the_classes_a_run_did_not_measure():
    row = dict(arch="sm_90", dtype="bfloat16", head_dim=64, n_min=0, n_max=None, measured="x", **{"pass": "training"})
    old = _measured.dump([{**row, "backend": "a"}, {**row, "backend": "b", "inputs": "gqa"}], "old")
    merged = yaml.safe_load(_measured.merge(old, [{**row, "backend": "c", "inputs": "gqa"}], "new"))["winners"]
    assert [(r["backend"], r.get("inputs", "plain")) for r in merged] == [("a", "plain"), ("c", "gqa")]
    assert yaml.safe_load(_measured.merge(None, [{**row, "backend": "c"}], "new"))["winners"][0]["backend"] == "c"


def test_an_unknown_class_of_inputs_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(_measured.dump([dict(arch="cpu", dtype="float32", head_dim=32, n_min=0, n_max=None, measured="x",
                                         backend="math", inputs="masked", **{"pass": "inference"})], "a test"))
    q, k, v, table = _qkv(17, False)
    with settings.override(measured=str(path)), pytest.raises(ValueError, match="inputs must be one of"):
        select.clear_cache()
        attnhub.explain(q, k, v, table)
    select.clear_cache()
