"""attnhub.benchkit: the shapes, the CPU stand-in of the timer, the error measure against float64 and the
environment record."""

from __future__ import annotations

import pytest
import torch

import attnhub
from attnhub import benchkit


def test_shapes():
    assert [(s.B, s.H, s.N, s.D, s.P) for s in benchkit.VIT_SHAPES.values()] == [
        (256, 6, 197, 64, 1), (256, 12, 197, 64, 1), (128, 16, 197, 64, 1), (64, 12, 577, 64, 1),
        (32, 12, 1029, 64, 5)]
    assert benchkit.parse_shape("vit_b16_512_reg4") == benchkit.Shape("vit_b16_512_reg4", 32, 12, 1029, 64, 5, 32)
    assert benchkit.parse_shape("tiny_host") is benchkit.TINY
    assert benchkit.parse_shape("custom:2,2,17,32,1,4").N == 17
    with pytest.raises(ValueError, match="P \\+ grid"):
        benchkit.parse_shape("custom:2,2,18,32,1,4")
    with pytest.raises(ValueError, match="unknown shape"):
        benchkit.parse_shape("vit_h14")


def test_time_ms_resets_grads_and_reports_ms():
    x = torch.ones(3, requires_grad=True)
    seen = []

    def step():
        seen.append(x.grad)
        (x * 2).sum().backward()

    ms = benchkit.time_ms(step, device="cpu", warmup=1, rep=2, grads=[x])
    assert ms > 0 and seen[-1] is None  # every timed repetition starts without the previous gradient
    assert len(benchkit.host_us([lambda: None, lambda: None], calls=20, device="cpu")) == 2


def test_errors_against_float64_math():
    s = benchkit.parse_shape("custom:1,2,17,32,1,4")
    x = benchkit.inputs(s, "cpu", torch.float32)
    table = benchkit.rope_table(s, "cpu")
    ref = benchkit.reference(x, table, backward=True)
    assert all(t.dtype == torch.float64 for t in ref)
    q, k, v = (x[n].clone().requires_grad_() for n in "qkv")
    o = attnhub.attention(q, k, v, table, backend="math")
    o.backward(x["do"])
    errs = benchkit.errors([o, q.grad, k.grad, v.grad], ref)
    assert set(errs) == {"o", "dq", "dk", "dv"} and benchkit.within_bounds(errs, torch.float32)
    assert not benchkit.within_bounds({**errs, "o": 1e-2}, torch.float32)
    assert not benchkit.within_bounds({**errs, "dq": float("nan")}, torch.float32)
    assert benchkit.errors([o, None, None, None], ref)["dq"] is None


def test_environment():
    env = benchkit.environment("cpu")
    assert env["device"] == "cpu" and env["compute_capability"] is None and env["driver"] is None
    assert set(env["versions"]) == {"attnhub", "torch", "triton", "timm", "python"}
    assert env["git_commit"] is None or len(env["git_commit"].removesuffix("+dirty")) == 40


def test_environment_records_the_attnhub_variables_set(monkeypatch):
    monkeypatch.setenv("ATTNHUB_TRITON_REPLAY", "1")
    monkeypatch.setenv("ATTNHUB_GIT_COMMIT", "cd4df1b")
    settings = benchkit.environment("cpu")["settings"]
    assert settings["ATTNHUB_TRITON_REPLAY"] == "1" and "ATTNHUB_GIT_COMMIT" not in settings


def test_git_commit_named_by_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNHUB_GIT_COMMIT", "cd4df1b")
    assert benchkit.environment("cpu")["git_commit"] == "cd4df1b"


@pytest.mark.parametrize("timer", [benchkit.gpu_ms, benchkit.gpu_kernels_ms])
def test_gpu_timers_need_a_cuda_device(timer):
    with pytest.raises(ValueError, match="CUDA"):
        timer(lambda: None, device="cpu")


def test_nan_empty_poisons_new_floating_buffers_within_the_block():
    real = torch.empty, torch.empty_like
    with benchkit.nan_empty():
        assert torch.empty(3).isnan().all() and torch.empty_like(torch.ones(2, 2)).isnan().all()
        assert torch.empty(3, dtype=torch.int32).dtype == torch.int32  # integers as they come
    assert (torch.empty, torch.empty_like) == real
