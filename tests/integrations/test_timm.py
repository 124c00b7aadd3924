"""attnhub.integrations.timm on tiny random timm models (CPU, float32): patched == timm, in outputs and gradients.

Every comparison is patched vs unpatched timm on the same weights and inputs, with the float32 bound of
attnhub.tolerances (1e-5) per tensor: both sides compute in float32, so they differ by round-off only (the
automatic backend on the CPU, torch_sdpa, is usually bit-equal; the Triton kernel in the interpreter sums in
another order).
"""

from __future__ import annotations

import copy
import inspect
import io
import os

import pytest
import torch

import attnhub
from tests.helpers import assert_close_rel, assert_same_grads

timm = pytest.importorskip("timm")
from attnhub.integrations import timm as at  # noqa: E402  (needs timm)

F32 = torch.float32
# head_dim 32; layer scale 1 (timm's 1e-5 would hide the attention branch in the logits)
TINY = dict(pretrained=False, depth=2, embed_dim=64, num_heads=2, num_classes=5, init_values=1.0)
# family: (timm model name, extra kwargs, prefix tokens, layout, per-head table)
FAMILIES = {
    "rope_axial": ("vit_small_patch16_rope_224", {}, 1, "interleaved", False),
    "rope_axial_sep_qkv": ("vit_small_patch16_rope_224", dict(qkv_fused=False), 1, "interleaved", False),
    "rope_axial_qknorm": ("vit_small_patch16_rope_224", dict(qk_norm=True), 1, "interleaved", False),  # >= 1.0.30
    "dinov3_reg4": ("vit_small_patch16_dinov3", {}, 5, "half", False),
    "dinov3_qkvb_reg4": ("vit_small_patch16_dinov3_qkvb", {}, 5, "half", False),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}, 1, "interleaved", True),
    # grouped-query attention (timm >= 1.0.30): 4 heads of 32 read 2 k/v heads; with the output norm
    "rope_axial_gqa_norm": ("vit_small_patch16_rope_224", dict(
        embed_dim=128, num_heads=4, num_kv_heads=2, qkv_fused=False, scale_attn_inner=True), 1, "interleaved", False),
    "dinov3_norm": ("vit_small_patch16_dinov3", dict(scale_attn_inner=True), 5, "half", False),
}


def create(name: str, seed: int = 0, img_size: int = 64, **kwargs) -> torch.nn.Module:
    """A tiny timm model with random weights; every parameter is jittered so that zero-initialized biases count."""
    if name not in timm.list_models():
        pytest.skip(f"timm {timm.__version__} has no model {name!r}")
    unknown = set(kwargs) - set(inspect.signature(timm.models.eva.Eva.__init__).parameters)
    if unknown:
        pytest.skip(f"timm {timm.__version__}: Eva takes no {sorted(unknown)}")
    torch.manual_seed(seed)
    return jitter(timm.create_model(name, img_size=img_size, **{**TINY, **kwargs}))


def jitter(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return model


def pair(name: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(timm model, patched deep copy with the same weights)."""
    ref = create(name, **kwargs)
    return ref, at.patch(copy.deepcopy(ref))


@pytest.fixture
def calls(monkeypatch):
    """Counts `attnhub.attention` (and `attention_packed`, a fused projection's) calls and the tables they got
    (proof that the patch routes through attnhub)."""
    seen = []
    real, real_packed = attnhub.attention, attnhub.attention_packed

    def spy(q, k, v, rope=None, **kw):
        seen.append(rope)
        return real(q, k, v, rope, **kw)

    def spy_packed(qkv, rope=None, **kw):
        seen.append(rope)
        return real_packed(qkv, rope, **kw)

    monkeypatch.setattr(attnhub, "attention", spy)
    monkeypatch.setattr(attnhub, "attention_packed", spy_packed)
    return seen


def images(seed: int, hw=(64, 64), batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *hw, generator=g)


def run(model: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and every parameter's gradient of the loss sum(logits * w)."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training_step(ref, pat, x) -> None:
    w = torch.randn(x.shape[0], ref.num_classes, generator=torch.Generator().manual_seed(7))
    out_ref, g_ref = run(ref, x, w)
    out_pat, g_pat = run(pat, x, w)
    assert_close_rel(out_pat, out_ref, F32, "logits")
    assert_same_grads(g_pat, g_ref, F32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_equals_timm(family, calls):
    name, kwargs, prefix, layout, per_head = FAMILIES[family]
    ref, pat = pair(name, **kwargs)
    assert ref.num_prefix_tokens == prefix
    assert at.patched(pat) == ["blocks.0.attn", "blocks.1.attn"] and at.patched(ref) == []
    assert_same_training_step(ref, pat, images(1))

    assert len(calls) == 2  # one attnhub call per block
    for table in calls:
        assert (table.prefix_tokens, table.layout, table.per_head, table.head_dim) == (prefix, layout, per_head, 32)
        assert table.n_grid == 16  # 64 px / 16 = a 4 x 4 grid
    if per_head:  # RoPE-Mixed: learnable frequencies, and the gradient reaches them through the table
        assert all(t.requires_grad for t in calls) and pat.rope.freqs.grad.norm() > 0


def test_eva_qkv_bias_separate():
    """EvaAttention's other bias path (`qkv(x) + bias`); no timm model sets it, so it is set on the modules."""
    ref = create(FAMILIES["dinov3_qkvb_reg4"][0])
    assert ref.blocks[0].attn.q_bias is not None
    for block in ref.blocks:
        block.attn.qkv_bias_separate = True
    assert_same_training_step(ref, at.patch(copy.deepcopy(ref)), images(13))


@pytest.mark.parametrize("family", ["rope_axial", "dinov3_reg4"])
def test_gated_attention(family):
    """The attention modules' sigmoid gate (newer timm; no Eva option sets it, so gated modules are swapped in)."""
    name, kwargs, *_ = FAMILIES[family]
    ref = create(name, **kwargs)
    cls = type(ref.blocks[0].attn)
    if "gated" not in inspect.signature(cls.__init__).parameters:
        pytest.skip(f"timm {timm.__version__}: {cls.__name__} has no gate")
    for block in ref.blocks:
        old = block.attn
        block.attn = cls(64, num_heads=2, num_prefix_tokens=old.num_prefix_tokens, rotate_half=old.rotate_half,
                         gated=True, norm_layer=torch.nn.LayerNorm)
    jitter(ref)
    assert_same_training_step(ref, at.patch(copy.deepcopy(ref)), images(14))


# conftest sets TRITON_INTERPRET=1 on machines without CUDA; with CUDA the kernel cannot take CPU tensors
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@interpreter
@pytest.mark.parametrize("family", ["rope_axial", "dinov3_reg4", "rope_mixed"])
def test_forced_triton_interpreter(family, calls):
    """The fused Triton kernel (Triton CPU interpreter, float32) inside the patched model, forward and backward;
    RoPE-Mixed's learnable frequencies get their gradient through triton_fa_rope's table gradient."""
    name, kwargs, _, _, per_head = FAMILIES[family]
    ref, pat = pair(name, img_size=32, **kwargs)
    with attnhub.use_backend("triton_fa_rope"):
        assert_same_training_step(ref, pat, images(2, (32, 32)))
    if per_head:
        assert all(t.requires_grad for t in calls) and pat.rope.freqs.grad.norm() > 0


@pytest.mark.parametrize("family", ["rope_axial", "dinov3_reg4", "rope_mixed"])
def test_dynamic_img_size(family, calls):
    """One model, two grids (square, then not): the embedding timm passes in already fits the grid."""
    name, kwargs, *_ = FAMILIES[family]
    ref, pat = pair(name, dynamic_img_size=True, **kwargs)
    for step, hw in enumerate([(64, 64), (48, 80)]):
        assert_same_training_step(ref, pat, images(10 + step, hw))
    assert [t.n_grid for t in calls] == [16, 16, 15, 15]
    ref.eval(), pat.eval()
    with torch.no_grad():
        x = images(12, (80, 32))
        assert_close_rel(pat(x), ref(x), F32, "logits (eval, no grad)")


def test_table_follows_in_place_change_of_timm_embedding():
    """The table cache is keyed on the embedding tensor and its version: an in-place edit is seen."""
    ref, pat = pair(FAMILIES["rope_axial"][0])
    x = images(4)
    with torch.no_grad():
        before = pat(x)
        for m in (ref, pat):
            m.rope.pos_embed.mul_(0.5)  # the fixed-grid embedding buffer timm hands every block
        after = pat(x)
        assert not torch.equal(before, after)
        assert_close_rel(after, ref(x), F32, "logits after the embedding changed")


def test_unpatch_restores_timm(calls):
    ref, pat = pair(FAMILIES["dinov3_reg4"][0])
    assert at.patch(pat) is pat and at.patched(pat) == ["blocks.0.attn", "blocks.1.attn"]  # patching twice: no-op
    assert at.unpatch(pat) is pat and at.patched(pat) == []
    assert [type(b.attn) for b in pat.blocks] == [type(b.attn) for b in ref.blocks]
    x = images(5)
    assert torch.equal(pat(x), ref(x))
    assert calls == []


def test_patched_model_pickles():
    ref, pat = pair(FAMILIES["rope_axial"][0])
    buf = io.BytesIO()
    torch.save(pat, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert at.patched(loaded) == at.patched(pat)
    x = images(6)
    with torch.no_grad():
        assert_close_rel(loaded(x), ref(x), F32, "logits of the reloaded model")


def test_model_without_rope_is_refused():
    model = create("vit_small_patch16_rope_224", use_rot_pos_emb=False)
    with pytest.raises(ValueError, match="nothing to patch"):
        at.patch(model)


def test_attn_mask_is_refused():
    _, pat = pair(FAMILIES["rope_axial"][0])
    x = torch.randn(2, 17, 64)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        pat.blocks[0].attn(x, rope=pat.rope.get_embed(), attn_mask=torch.ones(17, 17, dtype=torch.bool))


def test_attention_dropout_is_refused_in_training_only():
    ref, pat = pair(FAMILIES["rope_axial"][0], attn_drop_rate=0.1)
    x = images(8)
    with pytest.raises(NotImplementedError, match=r"attn_drop p=0\.1"):
        pat(x)
    ref.eval(), pat.eval()
    with torch.no_grad():
        assert_close_rel(pat(x), ref(x), F32, "logits (eval: no dropout)")


@pytest.mark.parametrize("family", ["rope_axial", "dinov3_reg4", "rope_mixed"])
def test_patch_dropout(family, calls):
    """Patch dropout gathers timm's embedding per sample ([B, 1|H, N_kept, 2*D]): per-sample tables, same RNG."""
    name, kwargs, *_ = FAMILIES[family]
    ref, pat = pair(name, patch_drop_rate=0.5, **kwargs)
    x = images(9)
    w = torch.randn(x.shape[0], ref.num_classes, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(3)
    out_ref, g_ref = run(ref, x, w)
    torch.manual_seed(3)
    out_pat, g_pat = run(pat, x, w)
    assert_close_rel(out_pat, out_ref, F32, "logits")
    for n, g in g_ref.items():
        if g is not None and g.norm() > 0:
            assert_close_rel(g_pat[n], g, F32, f"grad {n}")
    assert all(t.batched and t.n_grid == 8 for t in calls)  # half of the 4 x 4 grid kept, per sample


# ------------------------------------------------------------------------------------------------------ pins
@pytest.fixture
def toys():
    """Backends toy_a, toy_b (CPU, below torch_sdpa): they run math and record their name in the returned list."""
    ran: list[str] = []
    math = attnhub.REGISTRY.entry("math")
    for i, name in enumerate(("toy_a", "toy_b")):
        def fn(q, k, v, rope, scale, _name=name):
            ran.append(_name)
            return math(q, k, v, rope, scale)
        attnhub.register_backend(name, fn, priority=-10 - i, devices=["cpu"])
    return ran


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_patch_pins_by_name_and_by_pattern(toys, compiled):
    ref = create(FAMILIES["rope_axial"][0], depth=4)
    pat = at.patch(copy.deepcopy(ref), backend={"blocks.*": "toy_a", "blocks.[1-2].attn": "toy_b"})  # later wins
    assert attnhub.pinned(pat) == {"blocks.0.attn": "toy_a", "blocks.1.attn": "toy_b", "blocks.2.attn": "toy_b",
                                   "blocks.3.attn": "toy_a"}
    run_model = torch.compile(pat, backend="aot_eager", fullgraph=True) if compiled else pat
    x = images(8)
    with torch.no_grad():
        assert_close_rel(run_model(x), ref(x), F32, "logits")
    assert toys == ["toy_a", "toy_b", "toy_b", "toy_a"]
    at.patch(pat, backend="toy_b")  # a name pins every patched module; a new patch replaces the pins
    assert set(attnhub.pinned(pat).values()) == {"toy_b"}
    at.patch(pat)  # None: pins left as they are
    assert set(attnhub.pinned(pat).values()) == {"toy_b"}
    at.unpatch(pat)
    assert attnhub.pinned(pat) == {}


@pytest.mark.parametrize("backend,error,match", [
    (3, TypeError, "backend must be a backend name, a dict of module-name patterns"),
    ({3: "math"}, TypeError, "a dict of module-name patterns .str. to backend names .str.; got 3: 'math'"),
    ({"blocks.*": 3}, TypeError, "got 'blocks.*': 3"),
    ({"blocks.*": "nonesuch"}, attnhub.UnknownBackendError, r"backend\['blocks.\*'\]: unknown attnhub backend"),
    ({"blocks.*": "math", "blocks.9.attn": "math"}, ValueError,
     r"pattern 'blocks.9.attn' matches no patched module; the patched modules are \['blocks.0.attn', "
     r"'blocks.1.attn'\]"),
])
def test_bad_backend_leaves_the_model_as_it_was(backend, error, match):
    model = create(FAMILIES["rope_axial"][0])
    with pytest.raises(error, match=match):
        at.patch(model, backend=backend)
    assert at.patched(model) == [] and attnhub.pinned(model) == {}


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["rope_axial", "dinov3_reg4", "rope_mixed"])
def test_patched_on_gpu_runs_the_fused_kernel(family, calls):
    """On CUDA the patched model runs a Triton backend (chosen automatically). float32: equal to timm within float32
    round-off (IEEE fp32 dots). bf16 autocast: its error against timm in float32 is at most twice timm's own
    bf16 error (plus 1e-3), for the logits and every parameter gradient."""
    from attnhub.tolerances import rel_l2

    name, kwargs, *_ = FAMILIES[family]
    ref, pat = (m.cuda() for m in pair(name, **kwargs))
    x = images(4).cuda()
    w = torch.randn(x.shape[0], ref.num_classes, generator=torch.Generator().manual_seed(7)).cuda()
    truth = run(ref, x, w)
    got = {}
    for bf16 in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            got[bf16] = run(ref, x, w), run(pat, x, w)
    table = calls[0]
    q = torch.empty(x.shape[0], pat.blocks[0].attn.num_heads, table.seq_len, table.head_dim, device="cuda",
                    requires_grad=True)
    assert attnhub.explain(q, q, q, table).chosen.startswith("triton_")
    assert attnhub.explain(q.bfloat16(), q.bfloat16(), q.bfloat16(), table).chosen.startswith("triton_")

    (out_ref, g_ref), (out_pat, g_pat) = got[False]
    assert_close_rel(out_pat, out_ref, F32, "logits fp32")
    (out_tb, g_tb), (out_pb, g_pb) = got[True]
    pairs = [("logits", out_pb, out_tb, truth[0])] + [
        (f"grad {n}", g_pb[n], g_tb[n], g) for n, g in truth[1].items() if g is not None and g.norm() > 0]
    for what, mine, timms, exact in pairs:
        err, base = rel_l2(mine.float(), exact), rel_l2(timms.float(), exact)
        assert err <= 2 * base + 1e-3, f"{what} (bf16): attnhub error {err:.2e} vs timm's own {base:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "triton_fa_rope", "triton_rope_sdpa"], ids=["auto", "fa_rope", "rope_sdpa"])
def test_patched_model_under_cuda_graphs(backend):
    """torch.compile(mode="reduce-overhead") (CUDA graphs) on a patched model: replayed training steps under bf16
    autocast are as close to the float32 result as the eager patched model's (at most twice its error + 1e-3), for
    the logits and every parameter gradient."""
    from attnhub.tolerances import rel_l2

    name, kwargs, *_ = FAMILIES["rope_axial"]
    _, pat = (m.cuda() for m in pair(name, **kwargs))
    x = images(4, batch=8).cuda()
    w = torch.randn(x.shape[0], pat.num_classes, generator=torch.Generator().manual_seed(7)).cuda()
    graphed = torch.compile(pat, mode="reduce-overhead", fullgraph=True)
    with attnhub.use_backend(backend):
        truth = run(pat, x, w)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager = run(pat, x, w)
            for _ in range(4):  # warm-up, recording, then replays
                logits, grads = run(graphed, x, w)
    got = logits, {n.removeprefix("_orig_mod."): g for n, g in grads.items()}  # the compiled wrapper's names
    rows = [("logits", got[0], eager[0], truth[0])] + [
        (f"grad {n}", got[1][n], eager[1][n], g) for n, g in truth[1].items() if g is not None and g.norm() > 0]
    for what, mine, ref, exact in rows:
        err, base = rel_l2(mine.float(), exact), rel_l2(ref.float(), exact)
        assert err <= 2 * base + 1e-3, f"{what}: CUDA-graph error {err:.2e} vs eager's {base:.2e}"
