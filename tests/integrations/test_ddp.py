"""A patched timm RoPE-Axial ViT under DistributedDataParallel (2 CPU processes, gloo) trains as on one process.

Each rank trains on its half of one fixed global batch for 3 SGD steps; DDP averages the gradients, so with a
mean loss the result must equal one process training on the whole batch. Compared: every final parameter
against the single-process patched and unpatched runs, to float32 round-off (the float32 bound of attnhub.tolerances), after checking
that training moved the weights by far more than that.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from attnhub.tolerances import bound, rel_l2
from tests.helpers import assert_close_rel, free_port

timm = pytest.importorskip("timm")
from attnhub.integrations import timm as at  # noqa: E402  (needs timm)

MODEL = "vit_small_patch16_rope_224"
WORLD, STEPS, GLOBAL_BATCH, CLASSES = 2, 3, 8, 5


def _model(patch: bool) -> torch.nn.Module:
    torch.manual_seed(0)  # same initial weights on every rank and in the single-process runs
    model = timm.create_model(MODEL, pretrained=False, img_size=32, depth=2, embed_dim=64, num_heads=2,
                              num_classes=CLASSES, init_values=1.0)
    return at.patch(model) if patch else model


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()  # mean over the batch: DDP's gradient average matches it
        opt.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model(patch=True)
        assert at.patched(model), "nothing patched"
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = _global_batch()
        _train(ddp, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    init = _model(patch=False).state_dict()
    x, y = _global_batch()
    singles = {}
    for patch in (True, False):
        model = _model(patch)
        _train(model, x, y)
        singles["patched" if patch else "timm"] = model.state_dict()

    moved = rel_l2(torch.cat([ranks[0][n].flatten() for n in init]), torch.cat([init[n].flatten() for n in init]))
    assert moved > 100 * bound(torch.float32), f"training moved the weights by only {moved:.1e} (rel. L2)"
    for name in (n for n, _ in _model(patch=False).named_parameters()):
        for r in range(1, WORLD):
            assert torch.equal(ranks[r][name], ranks[0][name]), f"{name}: rank {r} differs from rank 0"
        for which, single in singles.items():
            assert_close_rel(ranks[0][name], single[name], torch.float32, f"DDP-trained {name} vs {which}")
