"""How fast the GPU's L2 takes fp32 atomic adds in the pattern a fused dK/dV + dQ backward would make: before
building one (benchmarks/README.md, session 15).

    python benchmarks/atomic_bw.py [--bh 384] [--n 1029] [--block 64] [--d 64]

Each program stands for one key block of one (batch, head): it adds a [BLOCK, D] fp32 tile into every query block
of its head's dQ accumulator [BH, N, D], as the fused kernel would add dS @ K. Prints GB/s of partials reduced
(`triton.testing.do_bench` median), against plain stores of the same tiles (each program writing its own copy, no
reduction) and the HBM copy bandwidth, and checks the sums. The fused backward breaks even at (32, 12, 1029, 64)
only above about 1.5 TB/s (1.7 GB of partials in today's 1.17 ms backward).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def add_tiles(acc, N, n_blocks, BLOCK: tl.constexpr, D: tl.constexpr, ATOMIC: tl.constexpr):
    """Program (key block kb, head bh): adds 1.0 to each element of every query block of head bh (ATOMIC), or
    stores it into its own copy of the head (kb-th slab of acc)."""
    kb, bh = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BLOCK)[:, None]
    cols = tl.arange(0, D)[None, :]
    ones = tl.full([BLOCK, D], 1.0, tl.float32)
    head = bh.to(tl.int64) * N * D
    slab = 0 if ATOMIC else (kb.to(tl.int64) * tl.num_programs(1)) * N * D
    for qb in range(0, n_blocks):
        r = qb * BLOCK + rows
        ptrs = acc + slab + head + r * D + cols
        if ATOMIC:
            tl.atomic_add(ptrs, ones, mask=r < N, sem="relaxed")
        else:
            tl.store(ptrs, ones, mask=r < N)


def run(bh: int, n: int, block: int, d: int) -> dict:
    n_blocks = triton.cdiv(n, block)
    grid = (n_blocks, bh)
    acc = torch.zeros(bh, n, d, device="cuda", dtype=torch.float32)
    add_tiles[grid](acc, n, n_blocks, BLOCK=block, D=d, ATOMIC=True)
    assert torch.all(acc == n_blocks), "atomic sums wrong"  # every element got one add per key block
    copies = torch.empty(n_blocks * bh, n, d, device="cuda", dtype=torch.float32)
    partial_bytes = n_blocks * bh * n * d * 4
    atomic_ms = triton.testing.do_bench(lambda: add_tiles[grid](acc, n, n_blocks, BLOCK=block, D=d, ATOMIC=True))
    store_ms = triton.testing.do_bench(lambda: add_tiles[grid](copies, n, n_blocks, BLOCK=block, D=d, ATOMIC=False))
    src = torch.empty(partial_bytes // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return {"partials_gb": partial_bytes / 1e9, "atomic_tb_s": partial_bytes / atomic_ms / 1e9,
            "store_tb_s": partial_bytes / store_ms / 1e9, "copy_tb_s": 2 * partial_bytes / copy_ms / 1e9,
            "atomic_ms": atomic_ms, "store_ms": store_ms}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bh", type=int, default=384, help="batch x heads (ViT-B/16@512 + 4 registers, B = 32: 384)")
    p.add_argument("--n", type=int, default=1029)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--blocks", default="64,128", help="key block sizes to try")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    for block in (int(b) for b in args.blocks.split(",")):
        r = run(args.bh, args.n, block, args.d)
        print(f"block {block:4d}: {r['partials_gb']:.2f} GB of partials; atomic adds {r['atomic_ms']:.3f} ms "
              f"({r['atomic_tb_s']:.2f} TB/s), plain stores {r['store_ms']:.3f} ms ({r['store_tb_s']:.2f} TB/s), "
              f"HBM copy {r['copy_tb_s']:.2f} TB/s (read + write)")


if __name__ == "__main__":
    main()
