"""The fake dataset and its sampler: reproducible, lazy, evenly sharded."""

from __future__ import annotations

import multiprocessing
import pickle
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from resnet_ddp.core.data import DeviceBatches, HostBatches, LazyFakeDataset, ShardedPermutationSampler, normalise


def test_sample_is_a_pure_function_of_seed_and_index():
    a = LazyFakeDataset(1000, 32, 10, seed=7)
    b = LazyFakeDataset(1000, 32, 10, seed=7)
    image, label = a[123]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert 0 <= label < 10
    assert torch.equal(image, b[123][0]) and label == b[123][1]
    assert not torch.equal(image, a[124][0])
    assert not torch.equal(image, LazyFakeDataset(1000, 32, 10, seed=8)[123][0])


def test_labels_cover_the_classes():
    ds = LazyFakeDataset(500, 32, 5, seed=0)
    assert {ds[i][1] for i in range(len(ds))} == set(range(5))


def test_workers_give_the_same_samples_as_the_main_process():
    ds = LazyFakeDataset(16, 32, 10, seed=3)
    # spawned: a fork of this test process (which other tests fill with threads) could hang in the child
    loaded = list(DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="spawn"))
    images = torch.cat([batch[0] for batch in loaded])
    labels = torch.cat([batch[1] for batch in loaded])
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(16)]))
    assert labels.tolist() == [ds[i][1] for i in range(16)]


# Set at run time in a rank: a forked worker sees it, a spawned one (a fresh interpreter) does not.
_SET_IN_THE_RANK = 0


class _WhereWorkersStart(LazyFakeDataset):
    def __getitem__(self, index):
        image, _ = super().__getitem__(index)
        return image, _SET_IN_THE_RANK


def _first_batch_of_a_rank(answer) -> None:
    global _SET_IN_THE_RANK
    _SET_IN_THE_RANK = 1
    dataset = _WhereWorkersStart(8, 8, 2, seed=0)
    batches = HostBatches(dataset, ShardedPermutationSampler(8, 0, 1, 0, 4), 4, 1, torch.device("cpu"))
    _, marks = next(batches.epoch(0))
    answer.put(marks.tolist())


@pytest.mark.skipif(sys.platform != "linux", reason="workers fork on Linux only")
def test_a_spawned_ranks_workers_fork_instead_of_starting_a_new_interpreter():
    # The launcher spawns its ranks, which makes spawn their default too; spawned workers would each import
    # torch again before the first batch.
    spawn = multiprocessing.get_context("spawn")
    answer = spawn.Queue()
    rank = spawn.Process(target=_first_batch_of_a_rank, args=(answer,))
    rank.start()
    try:
        assert answer.get(timeout=120) == [1, 1, 1, 1]
    finally:
        rank.join(timeout=60)


def test_nothing_is_stored_per_sample():
    small = pickle.dumps(LazyFakeDataset(100, 224, 100, seed=0))
    huge = pickle.dumps(LazyFakeDataset(10**12, 224, 100, seed=0))
    assert abs(len(huge) - len(small)) < 16  # only the digits of the length differ
    sampler = ShardedPermutationSampler(10**12, rank=1, world_size=8, seed=0)
    first = [index for _, index in zip(range(5), iter(sampler))]
    assert len(first) == 5 and all(0 <= i < 10**12 for i in first)


def test_sampler_shards_a_permutation_evenly_and_reshuffles_each_epoch():
    n, world = 10, 3
    samplers = [ShardedPermutationSampler(n, rank, world, seed=0) for rank in range(world)]
    shards = [list(s) for s in samplers]
    assert all(len(shard) == 4 == len(s) for shard, s in zip(shards, samplers))
    everything = sum(shards, [])
    assert set(everything) == set(range(n))  # every sample, padding by wrapping round
    for s in samplers:
        s.set_epoch(1)
    assert [list(s) for s in samplers] != shards
    assert sorted(list(ShardedPermutationSampler(n, 0, 1, seed=5))) == list(range(n))


def test_model_input_is_normalised_float_in_the_asked_layout():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    x = normalise(images, channels_last=False)
    assert x.dtype == torch.float32 and torch.allclose(x, torch.full_like(x, (255 - 127.5) / 64.0))
    assert normalise(images, channels_last=True).is_contiguous(memory_format=torch.channels_last)


def test_device_batches_match_the_epoch_length_and_are_reproducible():
    ds = LazyFakeDataset(10, 32, 4, seed=1)
    sampler = ShardedPermutationSampler(10, rank=0, world_size=2, seed=1, batch_size=2)
    batches = DeviceBatches(ds, sampler, batch_size=2, device=torch.device("cpu"))
    first = [(i.clone(), l.clone()) for i, l in batches.epoch(0)]
    assert len(first) == batches.steps_per_epoch == 3 and [len(l) for _, l in first] == [2, 2, 2]
    again = [(i.clone(), l.clone()) for i, l in batches.epoch(0)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    for images, labels in first:
        assert images.dtype == torch.uint8 and labels.max() < 4
        # the class colour is in every pixel: each image's minimum is at least its colour
        colours = torch.from_numpy(ds._class_colours)[labels]
        assert torch.all(images.amin(dim=(2, 3)) >= colours)
    assert not torch.equal(next(iter(batches.epoch(1)))[0], first[0][0])
    # a resumed epoch continues with the batches it would have had
    assert [torch.equal(i, a[0]) for (i, _), a in zip(batches.epoch(0, start_step=1), first[1:])] == [True, True]


def test_sampler_pads_epochs_to_whole_batches_on_every_rank():
    samplers = [ShardedPermutationSampler(100, rank, 2, seed=0, batch_size=8) for rank in range(2)]
    loaders = [DataLoader(LazyFakeDataset(100, 32, 3, seed=0), batch_size=8, sampler=s) for s in samplers]
    sizes = [[len(labels) for _, labels in loader] for loader in loaders]
    assert sizes[0] == sizes[1] == [8] * 7  # 100 samples over 2 ranks: 56 each, 7 full batches
    assert set(sum((list(s) for s in samplers), [])) == set(range(100))
