"""Train two copies of one model on the same batches, the plain eager step against a variant.

Used by the CPU tests (channels_last; BatchNorm handed its add and ReLU) over
gloo and the GPU tests over NCCL. The graphed variant hung twice on a 4 x H100
machine (2026-11-27) while the job's own graphed step trained fine beside it, so
the GPU test of CUDA graphs compares two real jobs instead; the variant stays
here for diagnosis, and every comparison ends its ranks after `timeout_s`
instead of hanging.
"""

from __future__ import annotations

import copy
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from conftest import free_port


def _rank_main(rank, port, backend, variant, steps, arch, world_size, out):
    from resnet_ddp.core.distributed import RankInfo
    from resnet_ddp.core.model import wrap_ddp
    from resnet_ddp.core.step import EagerStep, GraphedStep
    from resnet_ddp.layers.blocks import hand_relu_to_batchnorm
    from resnet_ddp.layers.syncbn import convert_sync_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.set_num_threads(1)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    info = RankInfo(rank, world_size, rank, world_size, device)
    torch.manual_seed(0)
    base = convert_sync_batchnorm(getattr(torchvision.models, arch)(num_classes=10))
    generator = torch.Generator().manual_seed(rank)
    size = 64 if cuda else 32
    batches = [
        (
            torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=generator),
            torch.randint(0, 10, (8,), generator=generator),
        )
        for _ in range(steps)
    ]
    results = {}
    for name in ("eager", variant):
        channels_last = name == "channels_last"
        model = copy.deepcopy(base)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if name == "fuse_bn_relu":
            model = hand_relu_to_batchnorm(model)
        stream = torch.cuda.Stream(device) if name == "graphed" else None
        model = wrap_ddp(model, info, sync_bn=True, stream=stream)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        step = EagerStep(model, torch.nn.CrossEntropyLoss(), optimizer, device, channels_last=channels_last)
        if stream is not None:
            step = GraphedStep(step, stream)
        losses = [step(images, labels).clone() for images, labels in batches]
        results[name] = (torch.stack(losses).cpu(), [p.detach().cpu() for p in model.parameters()])
    out[rank] = results
    dist.destroy_process_group()


def compare_steps(
    backend: str, variant: str, steps: int, timeout_s: float = 240, arch: str = "resnet18", world_size: int = 2
):
    """Returns ({rank: (losses, params)} for eager, the same for the variant).

    Training on random labels is chaotic: rounding differences (another conv
    algorithm, another layout) grow by about 10x a step, so layout changes are
    compared over a few steps. A graphed step replays the eager kernels, so it
    is compared past its warm-up (GraphedStep.WARMUP_STEPS) into the replays.
    """
    out = mp.get_context("spawn").Manager().dict()
    ranks = mp.start_processes(
        _rank_main,
        args=(free_port(), backend, variant, steps, arch, world_size, out),
        nprocs=world_size,
        start_method="spawn",
        join=False,
    )
    deadline = time.monotonic() + timeout_s
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            raise TimeoutError(f"compare_steps({backend!r}, {variant!r}) did not finish in {timeout_s:.0f} s")
    return ({r: out[r]["eager"] for r in range(world_size)}, {r: out[r][variant] for r in range(world_size)})
