"""SyncBatchNorm's collectives on symmetric memory in uncompiled steps.

Over NCCL each of the 106 small collectives of a ResNet-50 step is a kernel on
NCCL's own stream, and in a CUDA graph every one of them waits across streams.
Here every layer gets two slices of one buffer that all GPUs of the node map:
its forward's statistics (one row per rank) and its backward's sums. torch's
one-shot all-reduce then reads the peers' slices over NVLink, in one kernel on
the training stream, where NCCL's would each wait across streams (PERFORMANCE.md
has the measured difference).

Every collective has a slice of its own: a rank that has gone on to the next
layer never overwrites a slice a peer may still be reading.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from resnet_ddp.layers.syncbn import SyncBatchNorm, enable_symmetric_memory


def missing() -> Optional[str]:
    """Why this torch cannot run the uncompiled layer's collectives on symmetric memory, or None."""
    try:
        from torch.distributed import _symmetric_memory as symm_mem
    except ImportError as exc:
        return f"torch {torch.__version__} lacks {exc.name}"
    needs = {
        "torch.distributed._symmetric_memory.empty": hasattr(symm_mem, "empty"),
        "torch.distributed._symmetric_memory.rendezvous": hasattr(symm_mem, "rendezvous"),
        "torch.ops.symm_mem.one_shot_all_reduce": _has_op("one_shot_all_reduce"),
    }
    absent = [name for name, present in needs.items() if not present]
    return f"torch {torch.__version__} lacks {', '.join(absent)}" if absent else None


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.symm_mem, name)
    except (AttributeError, RuntimeError):
        return False
    return True


class LayerSlots:
    """One layer's two slices of the shared buffer, and its two collectives on them."""

    def __init__(self, rows: torch.Tensor, sums: torch.Tensor, rank: int, group_name: str):
        self.rows = rows  # (world size, 2C + 1): only this rank's row is ever written here, the rest stay zero
        self.sums = sums  # (2C,)
        self.rank = rank
        self.group_name = group_name

    def gather(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """Every rank's row of concatenated `parts`, as an all-gather would give: a sum whose other terms are zero."""
        torch.cat(parts, out=self.rows[self.rank])
        return torch.ops.symm_mem.one_shot_all_reduce(self.rows, "sum", self.group_name)

    def all_reduce(self, parts: List[torch.Tensor]) -> torch.Tensor:
        """The sum over ranks of concatenated `parts`."""
        torch.cat(parts, out=self.sums)
        return torch.ops.symm_mem.one_shot_all_reduce(self.sums, "sum", self.group_name)


def share_statistics(model: nn.Module, group, device: torch.device) -> None:
    """Give every SyncBatchNorm in `model` its slices of one symmetric buffer.

    A collective: every rank of `group` calls it with the same model. The layers
    then use the slices in training steps that are not compiled (compiled ones
    leave the choice to inductor, syncbn.use_symmetric_memory).
    """
    from torch.distributed import _symmetric_memory as symm_mem

    layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm) and m.process_group in (None, group)]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    row_lengths = [2 * layer.num_features + 1 for layer in layers]
    sum_lengths = [2 * layer.num_features for layer in layers]
    total = world * sum(row_lengths) + sum(sum_lengths)
    enable_symmetric_memory(group)
    buffer = symm_mem.empty(total, dtype=torch.float32, device=device)
    symm_mem.rendezvous(buffer, group.group_name)
    buffer.zero_()  # on this stream, before this rank's first collective lets any peer read it
    offset = 0
    for layer, row_length, sum_length in zip(layers, row_lengths, sum_lengths):
        rows = buffer[offset : offset + world * row_length].view(world, row_length)
        offset += world * row_length
        layer.symmetric_slots = LayerSlots(rows, buffer[offset : offset + sum_length], rank, group.group_name)
        offset += sum_length


def share_statistics_everywhere_or_nowhere(model: nn.Module, group, device: torch.device) -> Optional[str]:
    """share_statistics on every rank, or on none: returns why the layers stay on NCCL, or None.

    Mapping peers' memory can fail where the checks at start-up passed: a
    driver or container that refuses the shared handles, say. Every rank then
    learns whether any rank failed (one collective over `group`, before
    training) and all of them stay on NCCL together; a rank left on symmetric
    memory alone would wait for peers that never join its collectives. (A rank
    that fails inside the rendezvous itself, while its peers wait there for it,
    is not caught here: those peers go on waiting in it.)
    """
    try:
        share_statistics(model, group, device)
        failure = None
    except Exception as exc:  # whatever torch or the driver raised: the job goes on over NCCL
        message = str(exc).strip()
        failure = type(exc).__name__ + (f": {message.splitlines()[0]}" if message else "")
    failed = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(failed, group=group)
    if failed.item() == 0:
        return None
    for layer in model.modules():
        if isinstance(layer, SyncBatchNorm):
            layer.symmetric_slots = None
    return failure or "another rank could not set it up"
