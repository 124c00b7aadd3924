"""Run timm's Eva-family RoPE ViTs on `attnhub.attention`.

    model = timm.create_model("vit_base_patch16_rope_224")
    attnhub.integrations.timm.patch(model)   # in place; returns the model
    attnhub.integrations.timm.patch(model, backend={"blocks.*": "triton_fa_rope", "blocks.1[0-1].attn": "math"})
    attnhub.integrations.timm.unpatch(model)  # back to timm's own forward

Covers every `Eva` model with a RoPE module (`model.rope`): RoPE-Axial (`vit_*_patch16_rope_224`, interleaved
pairs), DINOv3 (`vit_*_patch16_dinov3*`, half layout, CLS + 4 registers), RoPE-Mixed
(`vit_*_patch16_rope_mixed_224`, one table per head and block with learnable frequencies) and any grid size
(`dynamic_img_size=True`): timm hands each attention module its embedding `rope: [N_grid, 2*D]` (or
`[H, N_grid, 2*D]` for RoPE-Mixed), which becomes a `CosSinTable` as is.

Also covers timm's variable-resolution `NaFlexVit` with `rope_type` "axial", "mixed", "dinov3" (or "mrope"),
and any NaFlexVit built of Eva blocks (`num_kv_heads`, `attn_type="rope"`/"eva"): in NaFlex mode (the collator's
dict {"patches", "patch_coord", "patch_valid"}) timm hands each block one embedding per sample, `[B, 1, N_grid,
2*D]` (`[B, H, N_grid, 2*D]` for RoPE-Mixed; zero rows at padding; gathered after patch dropout; with train-time
coordinate augmentation drawn by timm), taken as a per-sample `CosSinTable`. The patched NaFlexVit builds no
`[B, 1, L, L]` float mask: the blocks get the key validity as a bool `[B, 1, 1, P + L]` mask (`patch_valid` after
patch dropout, prefix tokens valid), which becomes attnhub's `key_padding_mask`. Padded query tokens then attend
to the valid keys (under timm's symmetric mask they attend uniformly to all keys); pooling ignores them either way.
timm reads each sample's grid size from the GPU with two `.item()` calls, once for the position embedding and once
for the RoPE tables (4 B host-device round trips per step); the patched NaFlexVit and its `NaFlexEmbeds` read them
in one copy each and then run timm's own code.

A patched attention module computes q, k, v exactly as timm does (fused or separate projections, EVA's q/v
bias, q/k norm), then `attnhub.attention(q, k, v, rope=table, scale=module.scale, key_padding_mask=...)` with
grouped k/v heads as they are (no repeated k/v) -- `attnhub.attention_packed(qkv, ...)` of a fused projection
without q/k norm, so that its gradient is written whole --, then timm's output norm, gate, projection and projection
dropout. Patching swaps the instance's class for a subclass that only overrides `forward` (NaFlexVit:
`_forward_embeds` and `_generate_rope_naflex`; NaFlexEmbeds: its two NaFlex position-embedding methods); timm's
classes are untouched and `unpatch` swaps them back. A patched attention module
takes as `attn_mask` only a key mask, bool `[B, 1, 1, N]` (True = attend; a sample with no valid key gets
zeros, where SDPA gives NaN); any other mask, `is_causal` and attention dropout in training raise
NotImplementedError naming the way out.

A patched model still goes through `torch.compile`, `torch.export` and FX symbolic tracing (`torch.fx`, timm's and
torchvision's `create_feature_extractor`): in an FX graph `attnhub.attention` (`attention_packed`) and the table
build are leaf calls, and a mask is refused when the graph runs. TorchScript cannot compile it: `torch.jit.script`
(of the model or of its FX graph) and `patch` under `timm.layers.set_scriptable(True)` raise NotImplementedError
naming the way out.
"""

from __future__ import annotations

import fnmatch
import logging
import weakref
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.layers import attention as _timm_attention
from timm.layers import is_scriptable, register_notrace_function
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.naflexvit import NaFlexEmbeds, NaFlexVit

import attnhub
from attnhub import control
from attnhub.rope import CosSinTable

__all__ = ["patch", "unpatch", "patched"]

log = logging.getLogger(__name__)


def patch(model: nn.Module, backend: str | Mapping[str, str] | None = None) -> nn.Module:
    """Route the attention of every RoPE-using Eva and every Eva-block NaFlexVit inside `model` through attnhub,
    in place; returns `model`.

    Patched: the `attn` of each block of an `Eva` whose `rope` is set, and of each Eva block of a `NaFlexVit`
    (any `rope_type`, or none with `num_kv_heads`), plus the NaFlexVit itself (its key padding, see the module
    docstring). Already patched modules are left as they are; `patched(model)` lists the attention modules.
    Raises ValueError when `model` holds no such module.

    `backend` pins backends (`attnhub.pin_backend`): a name pins every patched module; a dict maps `fnmatch`
    patterns over the patched modules' names in `model.named_modules()` (e.g. "blocks.0.attn",
    "blocks.1[0-1].attn", "blocks.*") to names, a later pattern winning over an earlier one, and the patched
    modules no pattern matches get no pin. None leaves pins as they are (none on a fresh model). Every argument is
    checked before the model changes: on an error (a pattern that matches no patched module lists the names it
    could match) the model is left as it was.
    """
    if is_scriptable():
        raise NotImplementedError(
            f"attnhub.integrations.timm.patch: timm.layers.set_scriptable(True) is on, and {_NO_TORCHSCRIPT}"
        )
    todo = {}  # name -> (module, patched class)
    for name, module in _rope_attention_modules(model):
        cls = _PATCHED.get(type(module), type(module))
        if cls not in _ORIGINAL:
            log.warning("attnhub: %s is a %s, not a timm attention class attnhub knows; left as is",
                        name, type(module).__name__)
            continue
        todo[name] = (module, cls)
    if not todo:
        raise ValueError(
            f"attnhub.integrations.timm.patch: model ({type(model).__name__}) holds no timm Eva model with RoPE "
            "(model.rope set) and no NaFlexVit of Eva blocks (rope_type set, or num_kv_heads); nothing to patch"
        )
    pins = _pins(backend, list(todo))
    _check_naflex(model)
    for naflex in _naflex_models(model):
        naflex.__class__ = AttnhubNaFlexVit
        if type(naflex.embeds) is NaFlexEmbeds:
            naflex.embeds.__class__ = AttnhubNaFlexEmbeds
    for name, (module, cls) in todo.items():
        module.__class__ = cls
        if pins is not None:
            control._pin(module, pins.get(name), name)
    log.info("attnhub: %d attention modules patched: %s", len(todo), ", ".join(todo))
    return model


def _pins(backend: str | Mapping[str, str] | None, names: list[str]) -> dict[str, str] | None:
    """{module name: backend} that `patch(model, backend)` pins, checked in full; None: leave pins as they are."""
    where = "attnhub.integrations.timm.patch: backend"
    if backend is None:
        return None
    if isinstance(backend, str):
        backend = {"*": backend}
    elif not isinstance(backend, Mapping):
        raise TypeError(f"{where} must be a backend name, a dict of module-name patterns to names, or None; "
                        f"got {type(backend).__name__}")
    known = attnhub.REGISTRY.specs()
    pins = {}
    for pattern, name in backend.items():
        if not isinstance(pattern, str) or not isinstance(name, str):
            raise TypeError(f"{where}: a dict of module-name patterns (str) to backend names (str); got "
                            f"{pattern!r}: {name!r}")
        if name not in known:
            raise attnhub.UnknownBackendError(f"{where}[{pattern!r}]: unknown attnhub backend {name!r}; "
                                              f"known: {sorted(known)}")
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"{where}: pattern {pattern!r} matches no patched module; the patched modules are "
                             f"{names}")
        pins.update(dict.fromkeys(matched, name))
    return pins


def unpatch(model: nn.Module) -> nn.Module:
    """Restore timm's own attention forward in every module `patch` changed, and drop their pins (which would do
    nothing there); returns `model`."""
    for module in model.modules():
        if type(module) in _ORIGINAL:
            module.__class__ = _ORIGINAL[type(module)]
            control._pin(module, None, "")
        elif type(module) is AttnhubNaFlexVit:
            module.__class__ = NaFlexVit
        elif type(module) is AttnhubNaFlexEmbeds:
            module.__class__ = NaFlexEmbeds
    return model


def patched(model: nn.Module) -> list[str]:
    """Qualified names of the attention modules of `model` that currently run on attnhub."""
    return [name for name, module in model.named_modules() if type(module) in _ORIGINAL]


def _rope_attention_modules(model: nn.Module):
    for prefix, vit in model.named_modules():
        if (isinstance(vit, Eva) and getattr(vit, "rope", None) is not None) or _is_eva_naflex(vit):
            for i, block in enumerate(vit.blocks):
                yield ".".join(filter(None, (prefix, "blocks", str(i), "attn"))), block.attn


def _is_eva_naflex(module: nn.Module) -> bool:
    """A NaFlexVit whose blocks are Eva blocks (any RoPE type, grouped k/v heads, attn_type 'rope'/'eva')."""
    return isinstance(module, NaFlexVit) and all(isinstance(b, EvaBlock) for b in module.blocks)


def _naflex_models(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) is NaFlexVit and _is_eva_naflex(m)]


def _check_naflex(model: nn.Module) -> None:
    """Refuse, before anything changes, the NaFlexVits whose mask path `AttnhubNaFlexVit` cannot take over."""
    for name, m in model.named_modules():
        if not _is_eva_naflex(m) or type(m) in (NaFlexVit, AttnhubNaFlexVit):
            continue
        raise NotImplementedError(
            f"attnhub.integrations.timm.patch: {name or 'model'} is a {type(m).__name__}, a subclass of timm's "
            "NaFlexVit; attnhub replaces the padding mask of NaFlexVit itself only. Build a NaFlexVit, or leave "
            "this model unpatched"
        )
    if not hasattr(NaFlexVit, "_forward_embeds") and _naflex_models(model):
        raise NotImplementedError(
            f"attnhub.integrations.timm.patch: timm {timm.__version__}'s NaFlexVit has no _forward_embeds, where "
            "attnhub takes over the padding mask; install timm >= 1.0.31 or leave the model unpatched"
        )


# ---------------------------------------------------------------------------------------------- the forward
def _forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
             is_causal: bool = False) -> torch.Tensor:
    """x: [B, N, C] with N = prefix tokens + grid; rope: [N_grid, 2*D], [H, N_grid, 2*D], or per sample
    [B, 1|H, N_grid, 2*D]; attn_mask: None or a key mask, bool [B, 1, 1, N] -> [B, N, C_out]."""
    key_padding = None
    # `is`, never bool(): under FX tracing both are Proxies, which the `_key_padding` leaf checks when the graph runs
    if attn_mask is not None or is_causal is not False:
        key_padding = _key_padding(x, attn_mask, is_causal)
    if self.training and self.attn_drop.p > 0:
        raise NotImplementedError(
            f"attnhub-patched timm attention: attention dropout (attn_drop p={self.attn_drop.p}) in training "
            "mode; attnhub has no dropout: build the model with attn_drop_rate=0 or call model.eval()"
        )
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv, (q, k, v) = _qkv(self, x)  # grouped-query attention: k, v keep their H_kv heads (attnhub reads h // groups)
    if not (isinstance(self.q_norm, torch.nn.Identity) and isinstance(self.k_norm, torch.nn.Identity)):
        q, k, qkv = self.q_norm(q), self.k_norm(k), None
    if isinstance(x, torch.fx.Proxy) and isinstance(rope, torch.Tensor):
        # FX tracing, timm's fixed-grid embedding buffer: made a graph value, so that the `_table` leaf builds the
        # table when the graph runs (following the buffer, its device and in-place edits) instead of now
        rope = torch.fx.Proxy(x.tracer.create_arg(rope), x.tracer)
    table = None if rope is None else _table(rope, self.num_prefix_tokens, getattr(self, "rotate_half", False))
    # [B, H, N, D], laid out [B, N, H, D]
    if qkv is not None:  # one fused projection: its gradient is written whole (attention_packed)
        x = attnhub.attention_packed(qkv, rope=table, scale=self.scale, key_padding_mask=key_padding)
    else:
        x = attnhub.attention(q, k, v, rope=table, scale=self.scale, key_padding_mask=key_padding)
    x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def _qkv(self, x: torch.Tensor):
    """x: [B, N, C] -> (qkv, (q, k, v)) as timm's EvaAttention / AttentionRope: with a fused projection qkv
    [B, N, 3, H, D] and q, k, v [B, H, N, D] its views; with separate ones None and q: [B, H, N, D], k, v:
    [B, H_kv, N, D]."""
    B, N, _ = x.shape
    if self.qkv is not None:
        if getattr(self, "q_bias", None) is None:
            qkv = self.qkv(x)
        else:  # EvaAttention: learnable q and v bias, a zero k bias
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x) + bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1)
        return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
    k = self.k_proj(x).reshape(B, N, _kv_heads(self), -1).transpose(1, 2)
    v = self.v_proj(x).reshape(B, N, _kv_heads(self), -1).transpose(1, 2)
    return None, (q, k, v)


def _kv_heads(self) -> int:
    """k/v heads: fewer than `num_heads` only with separate projections and `num_kv_heads` (timm >= 1.0.30)."""
    return self.num_heads if self.qkv is not None else getattr(self, "num_kv_heads", self.num_heads)


def _key_padding(x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor | None:
    """The key padding mask bool [B, N] of a key mask `attn_mask` bool [B, 1, 1, N] (True = attend: what the
    patched NaFlexVit hands its blocks; for SDPA the same mask), after refusing what attnhub does not compute.
    A leaf under FX tracing (see the end of this module): there `attn_mask` and `is_causal` are Proxies of the
    model's inputs, known only when the graph runs."""
    if is_causal:
        raise NotImplementedError("attnhub-patched timm attention: is_causal=True is not supported; unpatch the model")
    if attn_mask is None:
        return None
    B, N = x.shape[0], x.shape[1]
    if attn_mask.dtype != torch.bool or attn_mask.shape != (B, 1, 1, N):
        raise NotImplementedError(
            f"attnhub-patched timm attention: attn_mask of shape {tuple(attn_mask.shape)} and dtype {attn_mask.dtype}; "
            f"attnhub takes only key padding, a bool [B, 1, 1, N] = {(B, 1, 1, N)} mask (True = attend). For "
            "NaFlexVit leave attn_mask None and pass patch_valid (the patched model turns it into key padding); for "
            "any other mask unpatch the model (attnhub.integrations.timm.unpatch)"
        )
    return attn_mask[:, 0, 0, :]


# ----------------------------------------------------------------------------------------------- the table
# One slot: every block of a model gets the same embedding tensor in one forward (and the same buffer in every
# forward at a fixed grid), so the table is built once. The weak reference never keeps `emb` alive and never
# matches a new tensor that reuses a freed one's id.
_last: tuple | None = None  # (weakref to emb, emb._version, prefix_tokens, layout, table)


def _table(emb: torch.Tensor, prefix_tokens: int, half: bool) -> CosSinTable:
    """timm's `rope` argument -> CosSinTable: `[N_grid, 2*D]`, `[H, N_grid, 2*D]` (RoPE-Mixed), or one per
    sample, `[B, 1|H, N_grid, 2*D]` (NaFlexVit; patch dropout, gathered per token)."""
    global _last
    if emb.dim() not in (2, 3, 4):
        raise NotImplementedError(
            f"attnhub-patched timm attention: rope embedding of shape {tuple(emb.shape)}; attnhub takes timm's "
            "[N_grid, 2*D], [H, N_grid, 2*D] and [B, 1|H, N_grid, 2*D] embeddings; unpatch the model for others"
        )
    layout = "half" if half else "interleaved"
    # Not cached: tables that carry gradient (learnable frequencies) need this call's graph; under torch.compile
    # the build is traced into the graph; inference tensors have no version counter.
    cacheable = not (emb.requires_grad or torch.compiler.is_compiling() or emb.is_inference())
    if cacheable:
        hit = _last
        if hit is not None and hit[0]() is emb and hit[1:4] == (emb._version, prefix_tokens, layout):
            return hit[4]
    table = CosSinTable.from_sin_cos(emb, prefix_tokens=prefix_tokens, layout=layout, check=False)  # timm's own
    if cacheable:
        _last = (weakref.ref(emb), emb._version, prefix_tokens, layout, table)
    return table


# --------------------------------------------------------------------------------------- patched classes
def _refuse_scripting(*_):
    """torch.jit.script calls this on every submodule, and on every function a graph calls, before compiling them:
    a clear error instead of TorchScript's (patched modules; the leaves of an FX graph traced from a patched model)."""
    raise NotImplementedError(_NO_TORCHSCRIPT)


_NO_TORCHSCRIPT = (
    "attnhub-patched timm attention cannot be compiled by TorchScript (attnhub.attention picks its backend in "
    "Python). Script the model without attnhub (leave it unpatched, or attnhub.integrations.timm.unpatch(model)), "
    "or keep it patched and use torch.export.export or torch.compile, which run attnhub"
)


def _subclass(base: type) -> type:
    """A subclass of timm's `base` whose forward runs on attnhub; module-level, so patched models pickle."""
    attrs = {"forward": _forward, "__prepare_scriptable__": _refuse_scripting, "__module__": __name__}
    cls = type(f"Attnhub{base.__name__}", (base,), attrs)
    cls.__doc__ = f"timm's {base.__name__} with attention by `attnhub.attention` (see attnhub.integrations.timm)."
    globals()[cls.__name__] = cls
    return cls


_BASES = [EvaAttention] + ([_timm_attention.AttentionRope] if hasattr(_timm_attention, "AttentionRope") else [])
_PATCHED = {base: _subclass(base) for base in _BASES}  # timm class -> patched subclass
_ORIGINAL = {cls: base for base, cls in _PATCHED.items()}


# ------------------------------------------------------------------------------------------------ NaFlexVit
def _naflex_forward_embeds(self, x, patch_coord, patch_valid, attn_mask) -> dict:
    """timm's `NaFlexVit._forward_embeds` with the blocks' mask as key padding: bool [B, 1, 1, P + L] from
    `patch_valid` after patch dropout (prefix tokens valid), instead of timm's additive [B, 1, L, L] float mask.
    A mask the caller passes goes to the blocks as it is (they take a key mask, else refuse it)."""
    if attn_mask is not None or patch_valid is None:
        return NaFlexVit._forward_embeds(self, x, patch_coord, patch_valid, attn_mask)
    # any non-None attn_mask makes timm skip create_attention_mask and hand it on untouched; it is replaced here
    embeds = NaFlexVit._forward_embeds(self, x, patch_coord, patch_valid, _DEFERRED)
    embeds["attn_mask"] = _key_mask(embeds["patch_valid"], self.num_prefix_tokens)
    return embeds


_DEFERRED = object()


def _key_mask(patch_valid: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """patch_valid: [B, L] -> bool [B, 1, 1, P + L], True = attend (prefix tokens always)."""
    valid = patch_valid.bool()
    if prefix_tokens:
        valid = torch.cat([valid.new_ones(valid.shape[0], prefix_tokens), valid], dim=1)
    return valid[:, None, None, :]


def _grid_extent(patch_coord: torch.Tensor) -> torch.Tensor:
    """patch_coord: [B, L, 2] -> its per-sample maxima [B, 1, 2], on the host.

    timm's `calculate_naflex_grid_sizes` reads each sample's grid size with two `.item()` calls, and the position
    embedding and the RoPE tables each call it: 4 B synchronizing copies per step (264 at B = 64), each leaving
    the GPU idle while the host catches up. Given this extent it reads the same sizes from host memory: one copy.
    """
    return patch_coord.amax(dim=1, keepdim=True).cpu()


class AttnhubNaFlexVit(NaFlexVit):
    """timm's NaFlexVit whose blocks get key padding from patch_valid (see attnhub.integrations.timm), and whose
    RoPE tables read the grid sizes from the host in one copy."""

    _forward_embeds = _naflex_forward_embeds

    @torch.compiler.disable  # like timm's: the grid sizes become Python ints
    def _generate_rope_naflex(self, x, patch_coord):
        # timm's method reads patch_coord only through calculate_naflex_grid_sizes
        return NaFlexVit._generate_rope_naflex(self, x, _grid_extent(patch_coord))


class AttnhubNaFlexEmbeds(NaFlexEmbeds):
    """timm's NaFlexEmbeds whose NaFlex position embeddings read the grid sizes from the host in one copy."""

    @torch.compiler.disable
    def _apply_learned_naflex_pos_embed(self, x, patch_coord):
        # timm's methods read patch_coord only through calculate_naflex_grid_sizes
        return NaFlexEmbeds._apply_learned_naflex_pos_embed(self, x, _grid_extent(patch_coord))

    @torch.compiler.disable
    def _apply_factorized_naflex_pos_embed(self, x, patch_coord):
        return NaFlexEmbeds._apply_factorized_naflex_pos_embed(self, x, _grid_extent(patch_coord))


# FX symbolic tracing (torch.fx, torchvision's and timm's feature extraction) records these calls as single
# nodes instead of running them on Proxies: they read concrete values (the mask, the embedding's shape, the
# tables' facts). `torch.fx.wrap` covers every tracer; timm's own list also covers code that imported the
# function by name (`from attnhub import attention`).
torch.fx.wrap("_key_padding")
torch.fx.wrap("_table")
register_notrace_function(_key_mask)
_key_padding.__prepare_scriptable__ = _table.__prepare_scriptable__ = _refuse_scripting
register_notrace_function(attnhub.attention)
register_notrace_function(attnhub.attention_packed)
