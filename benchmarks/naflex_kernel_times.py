"""GPU time per kernel of triton_fa_rope fwd+bwd at bench_varlen's NaFlex case (B = 64, 12 heads, 576 tokens,
per-sample tables; q, k, v leaves laid out [B, N, H, D]) with the NaFlex key padding mask (10-40% padding at the
end), without a mask, and with an all-valid mask: what the mask costs each kernel. torch.profiler, 20 steps.

    python benchmarks/naflex_kernel_times.py      (a CUDA GPU; timm >= 1.0.31 for the NaFlex mask helper)
"""

import sys
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import attnhub

sys.path.insert(0, str(Path(__file__).parent))
from bench_varlen import make_case  # noqa: E402 - the NaFlex case of the variable-resolution benchmark

case = make_case("naflex", 64, torch.device("cuda"), torch.bfloat16)
valid = case["valid"]
print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}; valid fraction "
      f"{valid.float().mean().item():.3f}, per-sample min {valid.float().mean(1).min().item():.3f}", flush=True)
q, k, v = (case[n].detach().requires_grad_() for n in "qkv")
do = case["do"]
masks = {"naflex mask": valid, "no mask": None, "all-valid mask": torch.ones_like(valid)}
table = case["table"]
for name, mask in masks.items():
    def step():
        o = attnhub.attention(q, k, v, rope=table, backend="triton_fa_rope", key_padding_mask=mask)
        o.backward(do)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.count:
            rows[e.key] = (t / 20, e.count // 20)
    total = sum(t for t, _ in rows.values())
    print(f"\n== {name}: {total / 1000:.3f} ms GPU per step")
    for key, (t, c) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:10]:
        print(f"  {t / 1000:8.3f} ms  x{c}  {key[:90]}")
