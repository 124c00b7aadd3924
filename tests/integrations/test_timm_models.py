"""timm's own model tests (huggingface/pytorch-image-models `tests/test_models.py`) on attnhub-patched Eva models.

timm's test file is not in its wheel, so its functions are rewritten here step by step, on tiny random models
(depth 2, a 4 x 4 grid, CPU, float32): forward and backward, `test_model_forward_fx` / `test_model_backward_fx`
(symbolic tracing through timm's `_create_fx_model`, torchvision's feature extractor with timm's leaf lists),
FX feature extraction, `torch.export`, and TorchScript, which a patched model refuses with a clear error.
Each test also checks what the patch promises: the patched model equals timm's, its FX graph equals it, and
`attnhub.attention` is one leaf call per block in that graph.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import attnhub
from attnhub import attention
from tests.helpers import assert_close_rel

timm = pytest.importorskip("timm")
fx_extraction = pytest.importorskip("torchvision.models.feature_extraction")
from timm.models._features_fx import get_notrace_functions, get_notrace_modules  # noqa: E402

from attnhub.integrations import timm as at  # noqa: E402  (needs timm)

F32 = torch.float32
# family: (timm model name, image size, overrides); a 4 x 4 grid of patches and head_dim 32 everywhere
FAMILIES = {
    "rope_axial": ("vit_small_patch16_rope_224", 64, dict(embed_dim=64, num_heads=2)),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", 64, dict(embed_dim=64, num_heads=2)),
    "dinov3": ("vit_small_patch16_dinov3", 64, dict(embed_dim=64, num_heads=2)),
    "eva02": ("eva02_tiny_patch14_224", 56, dict(embed_dim=64, num_heads=2)),  # pixel-space RoPE, q/v bias, SwiGLU
    # grouped-query attention (timm >= 1.0.30): 4 heads read 2 k/v heads through separate projections
    "rope_axial_gqa": ("vit_small_patch16_rope_224", 64, dict(embed_dim=128, num_heads=4, num_kv_heads=2,
                                                              qkv_fused=False)),
}
DEPTH = 2
no_jit_deprecation = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def create(family: str, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    """(tiny timm model with random weights, one batch of images for it); `kwargs` as timm's tests pass them."""
    name, img_size, overrides = FAMILIES[family]
    if name not in timm.list_models():
        pytest.skip(f"timm {timm.__version__} has no model {name!r}")
    unknown = set(overrides) - set(inspect.signature(timm.models.eva.Eva.__init__).parameters)
    if unknown:
        pytest.skip(f"timm {timm.__version__}: Eva takes no {sorted(unknown)}")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=DEPTH, img_size=img_size, **overrides, **kwargs)
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    return model, x


def pair(family: str, **kwargs) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(timm model, patched deep copy with the same weights, images)."""
    ref, x = create(family, **kwargs)
    return ref, at.patch(copy.deepcopy(ref)), x


def create_fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's `_create_fx_model` (tests/test_models.py): torchvision's feature extractor with timm's leaf lists,
    returning the traced model's output node (in training, every node that feeds the output)."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = fx_extraction.get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        tracer = fx_extraction.NodePathTracer(**tracer_kwargs)
        graph = tracer.trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        output_node_indices = [-graph_node_names.index(node_name) for node_name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in output_node_indices]
    return fx_extraction.create_feature_extractor(
        model, train_return_nodes=train_return_nodes, eval_return_nodes=eval_return_nodes,
        tracer_kwargs=tracer_kwargs,
    )


def attention_leaves(graph_module: torch.fx.GraphModule) -> int:
    """How many `attnhub.attention` (`attention_packed`) calls the graph holds as single nodes."""
    return sum(n.op == "call_function" and n.target in (attnhub.api.attention, attnhub.api.attention_packed)
               for n in graph_module.graph.nodes)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_forward_backward(family):
    """timm's test_model_forward and test_model_backward, patched, against the unpatched model."""
    ref, pat, x = pair(family, num_classes=42)
    for model in (ref, pat):
        model.train()
        model(x).mean().backward()
    num_params = sum(p.numel() for p in pat.parameters())
    num_grad = sum(p.grad.numel() for p in pat.parameters() if p.grad is not None)
    assert num_params == num_grad, "Some parameters are missing gradients"
    g_ref, g_pat = grads(ref), grads(pat)
    for name, g in g_ref.items():
        if g.norm() > 0:
            assert_close_rel(g_pat[name], g, F32, f"grad {name}")
    pat.eval(), ref.eval()
    with torch.inference_mode():
        out = pat(x)
        assert out.shape == (2, 42) and not torch.isnan(out).any()
        assert_close_rel(out, ref(x), F32, "logits")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_forward_fx(family):
    """timm's test_model_forward_fx: the traced patched model returns exactly the patched model's output."""
    ref, model, inputs = pair(family)
    model.eval()
    with torch.inference_mode():
        outputs = model(inputs)
        fx_model = create_fx_model(model)
        fx_outputs = torch.cat(tuple(fx_model(inputs).values()))
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == inputs.shape[0]
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    assert attention_leaves(fx_model) == DEPTH  # one opaque call per block, not traced into
    with torch.inference_mode():
        assert_close_rel(fx_outputs, ref.eval()(inputs), F32, "traced patched model vs timm")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_backward_fx(family):
    """timm's test_model_backward_fx, and the traced model's gradients equal the patched model's."""
    _, model, inputs = pair(family, num_classes=42)
    model.train()
    model(inputs).mean().backward()
    eager = grads(model)
    model.zero_grad(set_to_none=True)

    num_params = sum(x.numel() for x in model.parameters())
    model = create_fx_model(model, train=True)
    outputs = torch.cat(tuple(model(inputs).values()))
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    traced = grads(model)
    assert traced.keys() == eager.keys()
    for name, g in eager.items():
        assert torch.equal(traced[name], g), f"grad {name}: traced != patched"


@pytest.mark.parametrize("family", ["rope_axial", "eva02"])
def test_fx_feature_extraction(family):
    """timm's FX feature extraction (`timm.layers.create_feature_extractor`): every block's output, as the
    patched model computes it."""
    _, pat, x = pair(family)
    pat.eval()
    seen = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k, b in enumerate(pat.blocks)]
    with torch.no_grad():
        pat(x)
        for h in hooks:
            h.remove()
        extractor = timm.layers.create_feature_extractor(pat, {f"blocks.{k}": f"block{k}" for k in range(DEPTH)})
        features = extractor(x)
    assert list(features) == [f"block{k}" for k in range(DEPTH)]
    for k in range(DEPTH):
        assert torch.equal(features[f"block{k}"], seen[k])


def test_fx_graph_refuses_a_mask_when_it_runs():
    """Traced, the model takes attn_mask and is_causal as graph inputs; attnhub refuses them at run time."""
    _, pat, x = pair("rope_axial")
    gm = torch.fx.symbolic_trace(pat.eval())
    with pytest.raises(NotImplementedError, match="attn_mask"):
        gm(x, attn_mask=torch.ones(17, 17, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="is_causal"):
        gm(x, is_causal=True)


def test_fx_graph_builds_the_table_when_it_runs():
    """timm's fixed-grid embedding is a buffer: the graph reads it when it runs (no table baked in at trace time)."""
    ref, pat, x = pair("rope_axial")
    gm = torch.fx.symbolic_trace(pat.eval())
    with torch.no_grad():
        for m in (ref, pat):
            m.rope.pos_embed.mul_(0.5)  # gm shares pat's buffers
        assert_close_rel(gm(x), ref.eval()(x), F32, "traced model after the embedding changed")


class ByModule(torch.nn.Module):
    def forward(self, q, k, v):
        return attnhub.attention(q, k, v) * 2


class ByName(torch.nn.Module):
    def forward(self, q, k, v):
        return attention(q, k, v) * 2


# torch.fx.wrap covers the `attnhub.attention` binding; a name imported from it only timm's leaf list covers
@pytest.mark.parametrize("cls, tracer", [(ByModule, "torch.fx"), (ByModule, "timm"), (ByName, "timm")])
def test_attention_is_one_leaf_in_any_model(cls, tracer):
    """Outside the patch too: `attnhub.attention` is a leaf for torch.fx (called as `attnhub.attention`) and for
    timm's feature extraction (also when imported by name, through timm's leaf-function list)."""
    q, k, v = torch.randn(3, 1, 2, 8, 16).unbind(0)
    if tracer == "torch.fx":
        gm = torch.fx.symbolic_trace(cls())
    else:
        gm = timm.layers.create_feature_extractor(cls(), ["mul"])
    assert attention_leaves(gm) == 1
    out = gm(q, k, v)
    assert torch.equal(out if tracer == "torch.fx" else out["mul"], cls()(q, k, v))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_export(family):
    """`torch.export.export` of a patched model: the exported program computes what the patched model does."""
    _, pat, x = pair(family)
    pat.eval()
    program = torch.export.export(pat, (x,))
    x2 = torch.randn_like(x)
    with torch.no_grad():
        for inputs in (x, x2):
            assert_close_rel(program.module()(inputs), pat(inputs), F32, "exported vs patched")


@no_jit_deprecation
def test_torchscript_is_refused_with_the_way_out():
    """timm's test_model_forward_torchscript and test_model_forward_fx_torchscript meet a clear error on a patched
    model; unpatched, the same model scripts, as the error says."""
    ref, pat, x = pair("dinov3")
    pat.eval()
    way_out = r"cannot be compiled by TorchScript.*unpatch\(model\).*torch\.export"
    with pytest.raises(NotImplementedError, match=way_out):
        torch.jit.script(pat)
    with pytest.raises(NotImplementedError, match=way_out):
        torch.jit.script(create_fx_model(pat))
    with timm.layers.set_scriptable(True), pytest.raises(NotImplementedError, match="set_scriptable"):
        at.patch(copy.deepcopy(ref))
    scripted = torch.jit.script(at.unpatch(pat))
    with torch.no_grad():
        assert_close_rel(scripted(x), ref.eval()(x), F32, "scripted unpatched model")
