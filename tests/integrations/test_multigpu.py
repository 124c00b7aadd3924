"""Two GPUs: DDP over NCCL (eager and compiled) and FSDP2 of a patched timm ViT, and a non-current device.

Run on a machine with two GPUs (the lent 2x H200): `pytest -m multigpu`. Skipped with fewer than two (conftest).

Each training case spawns WORLD processes from the test (torch.multiprocessing; no torchrun needed). Every rank
builds `vit_small_patch16_rope_224` (random weights, fewer blocks, smaller images) twice from one seed: timm's own,
and patched with attention pinned on `triton_fa_rope` (so the fused kernels run, and a pin must survive DDP, FSDP2
and torch.compile). Each is wrapped (DDP; torch.compile of DDP; FSDP2: `fully_shard` on each block, then on the
model), trained STEPS AdamW steps in float32 with TF32 off on the rank's shard of one fixed global batch, and its
full weights saved. The test checks that training moved the weights far beyond the bound, that the patched weights
equal timm's within the float32 bound (relative L2 over all weights, attnhub.tolerances), and that every rank holds
bitwise the same weights as rank 0.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import attnhub
from attnhub.tolerances import bound, rel_l2
from tests.helpers import BACKENDS, check_parity, free_port

timm = pytest.importorskip("timm")
from attnhub.integrations import timm as at  # noqa: E402  (needs timm)

pytestmark = pytest.mark.multigpu

MODEL = "vit_small_patch16_rope_224"
WORLD, STEPS, GLOBAL_BATCH, IMG, DEPTH, CLASSES = 2, 3, 8, 112, 4, 10  # 7x7 patches + CLS: N = 50, D = 64
PINNED = "triton_fa_rope"
MODES = ["ddp", "ddp_compiled", "fsdp2"]


def _model(patched: bool) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank, patched or not
    model = timm.create_model(MODEL, pretrained=False, img_size=IMG, depth=DEPTH, num_classes=CLASSES)
    return at.patch(model, backend=PINNED) if patched else model


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(GLOBAL_BATCH, 3, IMG, IMG, generator=g),
            torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g))


def _wrap(model: torch.nn.Module, mode: str, rank: int) -> torch.nn.Module:
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    return torch.compile(ddp) if mode == "ddp_compiled" else ddp


def _full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, gathered whole (FSDP2 holds DTensor shards), on the CPU."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for n, p in model.named_parameters()}


def _worker(rank: int, mode: str, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the bound is float32 round-off
    torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl", rank=rank, world_size=WORLD, device_id=torch.device("cuda", rank))
    try:
        x, y = (t.chunk(WORLD)[rank].cuda() for t in _global_batch())
        out = {}
        for patched in (False, True):
            model = _model(patched).cuda()
            wrapped = _wrap(model, mode, rank)
            opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
            for _ in range(STEPS):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(wrapped(x), y).backward()  # a mean: the ranks' gradient average is the global one
                opt.step()
            out["patched" if patched else "timm"] = _full_weights(model)
            if patched:
                out["pins"] = attnhub.pinned(model)
        out["init"] = _full_weights(_model(False))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.flatten().double() for _, w in sorted(weights.items())])


@pytest.mark.parametrize("mode", MODES)
def test_patched_training_equals_timm(mode, tmp_path):
    mp.spawn(_worker, args=(mode, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    first, limit = ranks[0], bound(torch.float32)
    assert set(first["pins"].values()) == {PINNED} and len(first["pins"]) == DEPTH
    moved = rel_l2(_flat(first["timm"]), _flat(first["init"]))
    assert moved > 100 * limit, f"{mode}: training moved the weights by only {moved:.1e} (relative L2)"
    err = rel_l2(_flat(first["patched"]), _flat(first["timm"]))
    worst = max(first["timm"], key=lambda n: rel_l2(first["patched"][n], first["timm"][n]))
    assert err <= limit, (f"{mode}: patched weights differ from timm's by {err:.2e} (relative L2) > {limit:.0e}; "
                          f"worst parameter {worst}")
    for r, other in enumerate(ranks[1:], start=1):
        for which in ("timm", "patched"):
            for name, w in first[which].items():
                assert torch.equal(other[which][name], w), f"{mode}: {which} {name} on rank {r} differs from rank 0"


@pytest.mark.parametrize("name", BACKENDS)
def test_tensors_on_a_device_that_is_not_current(name):
    """q, k, v on cuda:1 while cuda:0 is current: the kernels must run on cuda:1 (Triton launches on the current
    device unless told otherwise)."""
    assert torch.cuda.current_device() == 0
    g = torch.Generator().manual_seed(0)
    table = attnhub.CosSinTable(grid=(14, 14), head_dim=64, device="cuda:1")
    q, k, v, do = (torch.randn(2, 6, 197, 64, generator=g).to("cuda:1", torch.bfloat16) for _ in range(4))
    check_parity(name, q, k, v, do, table)
