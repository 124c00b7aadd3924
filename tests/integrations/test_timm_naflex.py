"""attnhub.integrations.timm on variable-resolution batches (CPU, float32): timm's NaFlexVit (RoPE axial, mixed,
DINOv3; patch dropout; RoPE coordinate augmentation) and grouped k/v heads, patched == timm.

Each case runs one training step of a tiny timm model and of its patched deep copy on the same weights, the same
NaFlex batch (several grid shapes, padded like timm's NaFlexCollator) and the same random stream (patch dropout
and the augmentation draw from it), and compares the pooled logits and every parameter gradient with the float32
bound of attnhub.tolerances. Padded tokens are not compared: timm's symmetric mask and attnhub's key padding give
them different outputs, which pooling ignores.
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch

import attnhub
from tests.helpers import assert_close_rel, assert_same_grads

timm = pytest.importorskip("timm")
naflexvit = pytest.importorskip("timm.models.naflexvit")
from attnhub.integrations import timm as at  # noqa: E402  (needs timm)

F32 = torch.float32
PATCH = 4  # pixels per patch side: tiny patches, tiny models
# 4 register tokens (naflexvit_base_patch16_gap's), head_dim 32, layer scale 1 (timm's 1e-5 hides attention)
TINY = dict(embed_dim=64, depth=2, num_heads=2, patch_size=PATCH, num_classes=5, init_values=1.0)
GRIDS = [(3, 5), (4, 4), (2, 6), (5, 2)]  # (h, w) per sample: four shapes, 10 to 16 patches
SEQ_LEN = 20  # the bucket length every sample is padded to
AUG = dict(rope_shift_coords=1.0, rope_jitter_coords=1.2, rope_rescale_coords=1.5)
ROPE_TYPES = {"axial": {}, "mixed": {}, "dinov3": {}, "mrope": dict(rope_mrope_section=(0, 4, 4))}
# mode: (training, patch_drop_rate, coordinate augmentation)
MODES = {
    "eval": (False, 0.3, True),  # both configured, neither applies in eval mode
    "train": (True, 0.0, False),
    "train_patch_drop": (True, 0.3, False),
    "train_aug": (True, 0.0, True),
    "train_patch_drop_aug": (True, 0.3, True),
}


def naflex(rope_type: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny naflexvit_base_patch16_gap with random weights, every parameter jittered (zero biases count)."""
    torch.manual_seed(seed)
    model = timm.create_model("naflexvit_base_patch16_gap", rope_type=rope_type, **{**TINY, **kwargs})
    return jitter(model)


def jitter(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return model


def collate(grids, seq_len: int = SEQ_LEN, seed: int = 1) -> dict[str, torch.Tensor]:
    """A NaFlex batch as timm's NaFlexCollator pads it: patches [B, L, P*P*3] float32 (zeros at padding),
    patch_coord int64 [B, L, 2] (y, x; zeros at padding), patch_valid bool [B, L] (a row-major prefix)."""
    g = torch.Generator().manual_seed(seed)
    B = len(grids)
    patches = torch.zeros(B, seq_len, PATCH * PATCH * 3)
    coord = torch.zeros(B, seq_len, 2, dtype=torch.int64)
    valid = torch.zeros(B, seq_len, dtype=torch.bool)
    for i, (h, w) in enumerate(grids):
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        patches[i, : h * w] = torch.randn(h * w, patches.shape[-1], generator=g)
        coord[i, : h * w] = torch.stack([y.flatten(), x.flatten()], dim=-1)
        valid[i, : h * w] = True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def run(model: torch.nn.Module, x, w: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    """Logits and every parameter's gradient of sum(logits * w), the random stream seeded first."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training_step(ref, pat, x, seed: int = 123) -> None:
    B = (x["patches"] if isinstance(x, dict) else x).shape[0]
    w = torch.randn(B, ref.num_classes, generator=torch.Generator().manual_seed(7))
    out_ref, g_ref = run(ref, x, w, seed)
    out_pat, g_pat = run(pat, x, w, seed)
    assert_close_rel(out_pat, out_ref, F32, "pooled logits")
    assert_same_grads(g_pat, g_ref, F32)


@pytest.fixture
def calls(monkeypatch):
    """Every `attnhub.attention` (`attention_packed`) call's (k heads, table, key_padding_mask): proof that the
    patch routes there."""
    seen = []
    real, real_packed = attnhub.attention, attnhub.attention_packed

    def spy(q, k, v, rope=None, **kw):
        seen.append((k.shape[1], rope, kw.get("key_padding_mask")))
        return real(q, k, v, rope, **kw)

    def spy_packed(qkv, rope=None, **kw):  # a fused projection [B, N, 3, H, D]
        seen.append((qkv.shape[3], rope, kw.get("key_padding_mask")))
        return real_packed(qkv, rope, **kw)

    monkeypatch.setattr(attnhub, "attention", spy)
    monkeypatch.setattr(attnhub, "attention_packed", spy_packed)
    return seen


def _refuse_dense_mask(*args, **kwargs):
    raise AssertionError("timm's create_attention_mask ran (the dense mask the attnhub path must not build)")


@pytest.fixture
def no_dense_mask(monkeypatch):
    """timm's create_attention_mask refuses to run: the patched model must not build the [B, 1, L, L] mask."""
    monkeypatch.setattr(naflexvit, "create_attention_mask", _refuse_dense_mask)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_naflex_equals_timm(rope_type, mode, calls, monkeypatch):
    training, drop, aug = MODES[mode]
    ref = naflex(rope_type, patch_drop_rate=drop, **ROPE_TYPES[rope_type], **(AUG if aug else {}))
    pat = at.patch(copy.deepcopy(ref))
    assert type(pat) is at.AttnhubNaFlexVit and at.patched(pat) == ["blocks.0.attn", "blocks.1.attn"]
    ref.train(training), pat.train(training)
    x = collate(GRIDS)
    assert_same_training_step(ref, pat, x)

    prefix, keep = ref.num_prefix_tokens, SEQ_LEN - (int(SEQ_LEN * drop) if training else 0)
    assert prefix == 4 and len(calls) == 2  # one attnhub call per block
    for _, table, mask in calls:
        assert table.batch == len(GRIDS) and table.per_head == (rope_type == "mixed")
        assert table.prefix_tokens == prefix and table.n_grid == keep
        assert mask.dtype == torch.bool and mask.shape == (len(GRIDS), prefix + keep) and mask[:, :prefix].all()
    if not (training and drop):  # the padding of the batch, untouched
        assert torch.equal(calls[0][2][:, prefix:], x["patch_valid"])
    if rope_type == "mixed":  # learnable frequencies: the gradient reaches them through the per-sample tables
        assert pat.rope.freqs.grad.norm() > 0

    # the same step builds no dense mask on the attnhub path
    monkeypatch.setattr(naflexvit, "create_attention_mask", _refuse_dense_mask)
    pat(x).sum().backward()


def test_augmentation_and_patch_dropout_take_effect():
    """The train-mode cases above compare something: augmented tables and dropped tokens change timm's output."""
    model = naflex("axial", patch_drop_rate=0.3, **AUG)
    x = collate(GRIDS)
    w = torch.ones(len(GRIDS), 5)
    model.eval()
    plain = run(model, x, w, seed=0)[0]
    model.train()
    assert not torch.allclose(run(model, x, w, seed=0)[0], plain)
    assert not torch.allclose(run(model, x, w, seed=1)[0], run(model, x, w, seed=0)[0])


@pytest.mark.parametrize("mode", ["eval", "train_patch_drop_aug"])
def test_naflex_grouped_kv_heads(mode, calls):
    """6 query heads read 2 k/v heads (AttentionRope, separate projections): k and v reach attnhub unrepeated."""
    training, drop, aug = MODES[mode]
    ref = naflex("axial", embed_dim=96, num_heads=6, num_kv_heads=2, qkv_fused=False, patch_drop_rate=drop,
                 **(AUG if aug else {}))
    pat = at.patch(copy.deepcopy(ref))
    ref.train(training), pat.train(training)
    assert_same_training_step(ref, pat, collate(GRIDS))
    assert [heads for heads, *_ in calls] == [2, 2]


@pytest.mark.parametrize("patch_drop_rate", [0.0, 0.5])
def test_eva_grouped_kv_heads(patch_drop_rate, calls):
    """An Eva RoPE ViT with 6 query heads over 2 k/v heads; with patch dropout the tables are per sample."""
    kw = dict(pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=96, num_heads=6, num_classes=5,
              init_values=1.0, attn_type="rope", num_kv_heads=2, qkv_fused=False, patch_drop_rate=patch_drop_rate)
    torch.manual_seed(0)
    ref = jitter(timm.create_model("vit_small_patch16_rope_224", **kw))
    pat = at.patch(copy.deepcopy(ref))
    assert_same_training_step(ref, pat, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    assert [heads for heads, *_ in calls] == [2, 2]
    assert all(table.batched == (patch_drop_rate > 0) for _, table, _ in calls)


def test_naflex_without_rope_grouped_kv_heads(calls):
    """A NaFlexVit of Eva blocks without RoPE (num_kv_heads alone): key padding, no table."""
    ref = naflex("", attn_type="rope", embed_dim=96, num_heads=6, num_kv_heads=2, qkv_fused=False)
    pat = at.patch(copy.deepcopy(ref))
    assert_same_training_step(ref, pat, collate(GRIDS))
    assert [(heads, table) for heads, table, _ in calls] == [(2, None), (2, None)]


def test_naflex_image_input(calls):
    """A patched NaFlexVit still takes a plain image batch (one grid, one table, no mask)."""
    ref = naflex("axial")
    pat = at.patch(copy.deepcopy(ref))
    assert_same_training_step(ref, pat, torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(4)))
    assert all(mask is None and not table.batched for _, table, mask in calls)


def test_naflex_key_only_mask_option(no_dense_mask):
    """timm's use_key_only_attn_mask changes nothing on the attnhub path (key padding either way)."""
    ref = naflex("dinov3", use_key_only_attn_mask=True)
    pat = at.patch(copy.deepcopy(ref))
    x = collate(GRIDS)
    with pytest.raises(AssertionError, match="create_attention_mask"):
        ref(x)  # timm itself builds its mask
    pat(x)


def test_caller_masks(calls):
    """A caller's key mask (bool [B, 1, 1, N], True = attend) is key padding; any other mask is refused clearly."""
    ref = naflex("axial")
    pat = at.patch(copy.deepcopy(ref))
    ref.eval(), pat.eval()
    x = collate(GRIDS)
    n = ref.num_prefix_tokens + SEQ_LEN
    key_mask = at._key_mask(x["patch_valid"], ref.num_prefix_tokens)
    with torch.no_grad():
        assert_close_rel(pat({**x, "attn_mask": key_mask}), ref({**x, "attn_mask": key_mask}), F32, "logits")
    dense = naflexvit.create_attention_mask(x["patch_valid"], ref.num_prefix_tokens)
    assert dense.shape == (len(GRIDS), 1, n, n)
    with pytest.raises(NotImplementedError, match=r"attn_mask of shape \(4, 1, 24, 24\).*patch_valid"):
        pat({**x, "attn_mask": dense})


def test_unpatch_and_pickle_naflex():
    ref = naflex("mixed")
    pat = at.patch(copy.deepcopy(ref))
    buf = io.BytesIO()
    torch.save(pat, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is at.AttnhubNaFlexVit and at.patched(loaded) == at.patched(pat)
    x = collate(GRIDS)
    ref.eval(), loaded.eval()
    with torch.no_grad():
        assert_close_rel(loaded(x), ref(x), F32, "logits of the reloaded model")
    at.unpatch(pat)
    assert type(pat) is type(ref) and type(pat.embeds) is naflexvit.NaFlexEmbeds and at.patched(pat) == []
    assert [type(b.attn) for b in pat.blocks] == [type(b.attn) for b in ref.blocks]


@pytest.mark.parametrize("rope_type, pos_embed", [("axial", "learned"), ("mixed", "factorized"),
                                                   ("dinov3", "learned")])
def test_grid_sizes_read_in_one_copy(rope_type, pos_embed, monkeypatch):
    """timm's calculate_naflex_grid_sizes (two `.item()` per sample) gets, in the patched model, each sample's
    largest coordinate already on the host, and returns the sizes it returns in timm's model."""
    seen = []
    real = naflexvit.calculate_naflex_grid_sizes

    def spy(coord):
        seen.append((coord.shape, coord.device, real(coord)))
        return seen[-1][2]

    monkeypatch.setattr(naflexvit, "calculate_naflex_grid_sizes", spy)
    ref = naflex(rope_type, pos_embed=pos_embed, patch_drop_rate=0.3)
    pat = at.patch(copy.deepcopy(ref))
    assert type(pat.embeds) is at.AttnhubNaFlexEmbeds
    x = collate(GRIDS)
    assert_same_training_step(ref.train(), pat.train(), x)
    sizes = [tuple(h_w) for h_w in (x["patch_coord"].amax(dim=1) + 1).tolist()]
    assert len(seen) == 4  # position embedding and RoPE tables, in each model
    for shape, device, got in seen[:2]:
        assert shape == x["patch_coord"].shape and got == sizes
    for shape, device, got in seen[2:]:
        assert shape == (len(GRIDS), 1, 2) and device.type == "cpu" and got == sizes


def _syncs(model, x) -> int:
    """Synchronizing CUDA calls of one training step (the first, which compiles and allocates, not counted)."""
    model(x).sum().backward()
    torch.cuda.synchronize()
    with pytest.warns(UserWarning) as record:  # mode "warn": a warning per synchronizing call
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in record)


@pytest.mark.gpu
def test_naflex_step_reads_grid_sizes_in_two_syncs():
    """timm's NaFlexViT train step waits for the GPU twice per sample and table (the grid sizes' `.item()`s) plus
    once per distinct grid (the learned position embedding copies its sample indices to the device); the patched
    step reads the grid sizes in two copies."""
    ref = naflex("axial", patch_drop_rate=0.3).cuda().train()
    pat = at.patch(copy.deepcopy(ref))
    x = {k: t.cuda() for k, t in collate(GRIDS).items()}
    B, grids = len(GRIDS), len(set(GRIDS))
    assert (_syncs(ref, x), _syncs(pat, x)) == (4 * B + grids, 2 + grids)


def test_naflex_subclass_is_refused_before_any_change():
    class MyNaFlexVit(naflexvit.NaFlexVit):
        pass

    model = naflex("axial")
    model.__class__ = MyNaFlexVit
    with pytest.raises(NotImplementedError, match="MyNaFlexVit, a subclass of timm's NaFlexVit"):
        at.patch(model)
    assert at.patched(model) == []


# conftest sets TRITON_INTERPRET=1 on machines without CUDA; with CUDA the kernel cannot take CPU tensors
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@interpreter
@pytest.mark.parametrize("rope_type, extra", [("mixed", {}), ("dinov3", dict(embed_dim=96, num_heads=6,
                                                                                  num_kv_heads=2, qkv_fused=False))],
                         ids=["mixed", "dinov3_gqa"])
def test_forced_triton_interpreter(rope_type, extra):
    """A Triton backend taking key padding, per-sample tables and grouped k/v heads (triton_rope_sdpa, in the
    CPU interpreter) inside the patched NaFlexVit, one training step with patch dropout and augmentation."""
    ref = naflex(rope_type, depth=1, patch_drop_rate=0.3, **AUG, **extra)
    pat = at.patch(copy.deepcopy(ref), backend="triton_rope_sdpa")
    assert_same_training_step(ref, pat, collate(GRIDS[:3], seq_len=16))
