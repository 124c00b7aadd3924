"""FlashAttention-style Triton forward and backward with 2D axial RoPE fused into the kernels.

Read in this order, one job per module:
    kernels.py        the `@triton.jit` code: jit helpers, the forward and rotation kernels, the backward kernels
    gluon_kernels.py  the Hopper forwards in Gluon (RoPE once per token): up to 256 tokens (Q, K, V resident) and
                      the pieces every Gluon forward shares
    gluon_long_kernels.py, gluon_stream_kernels.py
                      the longer ones: up to 640 tokens (K, V resident), past them (K resident, V through a ring)
    gluon_fwd.py      their eligibility, plan and launch; imported only when a call may take them
    gluon_bwd_kernels.py, gluon_bwd.py
                      the same for the split backward's dK/dV and dQ (from the config table's gluon_bwd_from_n
                      tokens on)
    configs.py        `KernelConfig`, `ArchConfigs`: one config table per GPU architecture, `for_call`,
                      `override`, and `LIMITS` (what the tables cover; the registry checks its entry against it)
    launch.py         compile-time parameters, grids, strides: `forward` and `backward` with an explicit config,
                      launched through `backends/_triton_runtime.py` (shared with triton_rope_sdpa: the only
                      module touching Triton internals, kept compiled runners, compiling ahead)
    replay.py         a cached eager training call's forward and backward replayed from C++, one call each
                      (`backends/_replay.py`), from a signature's second call on (ATTNHUB_TRITON_REPLAY)
    autograd.py       the `autograd.Function`s, the torch.compile custom operators and the entry `attention`

The registry's entry is `attention(q, k, v, rope, scale, *, key_padding_mask=None)` (q: [B, H, N, D], k, v:
[B, H_kv, N_kv, D]; rope shared, per head, per sample or from coordinates) -> o. It is imported from `autograd` on
first access, so that reading `configs` (the registry does, at `import attnhub`) loads neither Triton's kernels nor
the custom operators.

Switches: ATTNHUB_TRITON_BWD (the backward path), ATTNHUB_TRITON_COMPILE_AHEAD, ATTNHUB_TRITON_LAUNCHER and
ATTNHUB_TRITON_REPLAY, through `attnhub.settings`.
Under `TRITON_INTERPRET=1` (CPU) the interpreter's config table is used and bfloat16 dot operands are upcast to
fp32 (triton-lang/triton#11584).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attnhub.backends.triton_fa_rope.autograd import attention

__all__ = ["attention"]


def __getattr__(name: str):
    if name == "attention":
        from attnhub.backends.triton_fa_rope.autograd import attention

        globals()["attention"] = attention
        return attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
