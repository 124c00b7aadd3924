"""benchmarks/step_kernels.py and benchmarks/rotate_ab.py on the CPU: the kernel groups of a profiled step (names
as the H200's profiler reported them), and the rotation pass's variants (one launch for q and k, or one per
tensor; rows and warps per program) in the Triton interpreter: bitwise alike, and equal to `apply_rope`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnhub import benchkit
from attnhub.rope import apply_rope
from tests.helpers import load_script

pytest.importorskip("triton")

NAMES = {  # kernel name -> group, from results/h200_step_kernels_vit_b384.json
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0":
        "attention",
    "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)": "attention",
    "fwd_kernel": "attention",
    "rotate_kernel": "attention",
    "gluon_dkdv_kernel": "attention",
    "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_128x128_32x5_nhwc_align8>":
        "conv",
    "triton_red_fused__to_copy_convolution_backward_26": "conv",
    "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN": "gemm",
    "triton_poi_fused__unsafe_view_clone_permute_stack_view_16": "inductor",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::TensorListMetadata<1>>": "optimizer",
    "Memset (Device)": "other",
}


def _load(name, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # step_kernels: bench_e2e
    return load_script(name)


def test_kernel_groups(monkeypatch):
    step_kernels = _load("step_kernels", monkeypatch)
    assert {name: step_kernels.group_of(name) for name in NAMES} == NAMES


@pytest.mark.parametrize("h_kv", [3, 1], ids=["mha", "gqa"])
def test_rotation_variants_agree(h_kv, monkeypatch):
    rotate_ab = _load("rotate_ab", monkeypatch)
    s = benchkit.parse_shape("custom:2,3,37,64,1,6")  # 37 rows: a partial last block for every variant
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(s.B, s.H, s.N, s.D, generator=gen)
    k = torch.randn(s.B, h_kv, s.N, s.D, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)
    table = benchkit.rope_table(s, "cpu")
    outs = []
    for together, rows, warps in rotate_ab.VARIANTS.values():
        qr, kr = torch.full_like(q, float("nan")), torch.full(k.shape, float("nan"))
        rotate_ab.rotate(q, k, qr, kr, table, together, rows, warps)
        outs.append((qr, kr))
    for qr, kr in outs[1:]:
        assert torch.equal(qr, outs[0][0]) and torch.equal(kr, outs[0][1])
    torch.testing.assert_close(outs[0][0], apply_rope(q, table))  # interleaved: joined pair order is the layout's
    torch.testing.assert_close(outs[0][1], apply_rope(k, table))
