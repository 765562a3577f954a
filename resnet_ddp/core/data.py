"""The fake dataset, its per-rank sampler, and turning its batches into model input.

Nothing is stored per sample: an image and its label are computed from (seed,
index) on demand, and the sampler's shuffle is an affine permutation computed per
position. Host memory is therefore the same for 100 samples or 10 billion.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

# Images travel as uint8 (4x fewer bytes than float32) and are normalised on the device.
PIXEL_MEAN = 127.5
PIXEL_STD = 64.0


class LazyFakeDataset(Dataset):
    """3 x size x size uint8 images and labels in [0, num_classes), a pure function of (seed, index).

    Each image is uniform noise plus a colour that depends on its class, so a
    model can learn from it and the loss visibly falls.
    """

    def __init__(self, length: int, image_size: int, num_classes: int, seed: int):
        self.length = length
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        colours = np.random.Generator(np.random.SFC64([seed, 2**32])).integers(0, 128, size=(num_classes, 3))
        self._class_colours = colours.astype(np.uint8)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} outside a dataset of {self.length}")
        rng = np.random.Generator(np.random.SFC64([self.seed, index]))
        label = int(rng.integers(self.num_classes))
        shape = (3, self.image_size, self.image_size)
        image = np.frombuffer(rng.bytes(math.prod(shape)), dtype=np.uint8).reshape(shape).copy()
        image >>= 1
        image += self._class_colours[label][:, None, None]
        return torch.from_numpy(image), label


class ShardedPermutationSampler(Sampler):
    """This rank's share of a shuffled epoch, without materialising the permutation.

    Position p of epoch e maps to sample (a * p + b) mod n with gcd(a, n) = 1, a
    bijection drawn from (seed, epoch). Rank r takes positions r, r + W, r + 2W, ...
    The epoch is padded by wrapping round (as DistributedSampler pads to equal
    shares) up to whole batches on every rank: every step then has the same
    shape, which SyncBatchNorm, cuDNN's autotuning and CUDA graphs all want.
    """

    def __init__(self, dataset_length: int, rank: int, world_size: int, seed: int, batch_size: int = 1):
        self.n = dataset_length
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.samples_per_rank = math.ceil(dataset_length / (world_size * batch_size)) * batch_size
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Start `epoch`, at its `start`-th sample of this rank (to resume mid-epoch)."""
        self.epoch = epoch
        self.start = start

    def _permutation(self) -> Tuple[int, int]:
        rng = np.random.Generator(np.random.SFC64([self.seed, 2**32 + 1, self.epoch]))
        if self.n == 1:
            return 1, 0
        while True:
            a = int(rng.integers(1, self.n))
            if math.gcd(a, self.n) == 1:
                return a, int(rng.integers(self.n))

    def __len__(self) -> int:
        return self.samples_per_rank - self.start

    def __iter__(self) -> Iterator[int]:
        a, b = self._permutation()
        n, world, rank = self.n, self.world_size, self.rank
        for k in range(self.start, self.samples_per_rank):
            position = (k * world + rank) % n
            yield (a * position + b) % n


SHM_PATH = "/dev/shm"
SHM_MARGIN = 1.25  # allocator slack on top of the batches in flight


def host_batch_bytes(batch_size: int, image_size: int) -> int:
    """Bytes of one host-made batch as workers hand it over: uint8 images and int64 labels."""
    return batch_size * (3 * image_size**2 + 8)


def shm_free_bytes(path: str = SHM_PATH) -> int:
    try:
        stats = os.statvfs(path)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def fit_workers_to_shm(num_workers: int, batch_bytes: int, local_processes: int, free_bytes: int) -> Tuple[int, int]:
    """(workers, prefetch per worker) whose batches in flight fit in /dev/shm, where workers hand them over.

    Kubernetes gives a container 64 MB of /dev/shm unless a memory-backed volume
    is mounted there; DataLoader workers then die with a bus error mid-run. We
    keep as many workers as fit, prefetching 2 batches each, then 1; else none
    (batches made in the training process, which needs no shared memory).
    """
    for workers in range(num_workers, 0, -1):
        for prefetch in (2, 1):
            in_flight = local_processes * (workers * prefetch + 1) * batch_bytes * SHM_MARGIN
            if in_flight <= free_bytes:
                return workers, prefetch
    return 0, 2


class HostBatches:
    """Batches of LazyFakeDataset from DataLoader worker processes, handed to the step on its device.

    On a GPU each batch arrives pinned and is copied on a stream of its own, so
    the copy overlaps the previous step's work instead of holding up the
    training stream before the next step starts. The time the training process
    spends waiting for the next batch is counted in `data_wait_s`.
    """

    def __init__(
        self,
        dataset: LazyFakeDataset,
        sampler: ShardedPermutationSampler,
        batch_size: int,
        num_workers: int,
        device: torch.device,
        prefetch: int = 2,
    ):
        self.sampler = sampler
        self.device = device
        self.batch_size = batch_size
        self.steps_per_epoch = sampler.samples_per_rank // batch_size
        self.data_wait_s = 0.0
        on_gpu = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if on_gpu else None
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=on_gpu,
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch if num_workers > 0 else None,
            drop_last=False,
            worker_init_fn=_die_with_the_rank,
            # Fork on Linux, whatever this process's default is: a rank the launcher spawned has spawn as its
            # default too, and spawned workers each import torch again before the first batch. Forked workers
            # start at once; they run numpy only and never touch CUDA (Linux's default, and torchrun's).
            multiprocessing_context="fork" if num_workers > 0 and sys.platform == "linux" else None,
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator:
        """The batches of `epoch` from its `start_step` on (to resume mid-epoch)."""
        self.sampler.set_epoch(epoch, start_step * self.batch_size)
        batches = iter(self.loader)
        while True:
            waited_from = time.perf_counter()
            batch = next(batches, None)
            self.data_wait_s += time.perf_counter() - waited_from
            if batch is None:
                return
            yield batch if self.copy_stream is None else self._copied_to_device(batch)

    def close(self) -> None:
        """Stop the DataLoader's workers now. Left to the end of the process, a loader that something still
        holds (a reference cycle) was joined by multiprocessing's exit handler, which waited for ever on
        workers that ignore SIGTERM (_die_with_the_rank)."""
        self.loader = None  # the last reference: its persistent iterator shuts the workers down

    def _copied_to_device(self, batch):
        training = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            batch = [t.to(self.device, non_blocking=True) for t in batch]
        training.wait_stream(self.copy_stream)
        for t in batch:  # made on the copy stream, used on the training stream: freed after that use
            t.record_stream(training)
        return tuple(batch)


class DeviceBatches:
    """Fake batches made on the training device: no host work and no data loader at all.

    Same image recipe as LazyFakeDataset (uniform noise plus the class colour),
    drawn from a device generator seeded by (seed, rank, epoch, step), into buffers
    allocated once. The epoch has as many steps as the host dataset gives. Making a
    batch only enqueues kernels, so nothing here waits for data (`data_wait_s` stays 0).
    """

    data_wait_s = 0.0

    def __init__(
        self, dataset: LazyFakeDataset, sampler: ShardedPermutationSampler, batch_size: int, device: torch.device
    ):
        self.device = device
        self.seed = dataset.seed
        self.rank = sampler.rank
        self.num_classes = dataset.num_classes
        self.steps_per_epoch = sampler.samples_per_rank // batch_size
        self.batch_size = batch_size
        size = dataset.image_size
        self.colours = torch.from_numpy(dataset._class_colours).to(device)
        self.images = torch.empty((batch_size, 3, size, size), dtype=torch.uint8, device=device)
        self.labels = torch.empty((batch_size,), dtype=torch.int64, device=device)
        self.label_colours = torch.empty((batch_size, 3), dtype=torch.uint8, device=device)
        self.generator = torch.Generator(device=device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator:
        images, labels, colours = self.images, self.labels, self.label_colours
        for step in range(start_step, self.steps_per_epoch):
            # Seeded per step, so that a resumed epoch continues with the same batches.
            seed = np.random.SeedSequence([self.seed, self.rank, epoch, step]).generate_state(1)[0]
            self.generator.manual_seed(int(seed))
            torch.randint(self.num_classes, labels.shape, generator=self.generator, device=self.device, out=labels)
            torch.randint(
                128, images.shape, generator=self.generator, device=self.device, dtype=torch.uint8, out=images
            )
            torch.index_select(self.colours, 0, labels, out=colours)
            images += colours.view(-1, 3, 1, 1)
            yield images, labels

    def close(self) -> None:
        """Nothing to stop: no worker processes."""


def _die_with_the_rank(_worker_id: int) -> None:
    """In each DataLoader worker: the kernel ends it with its rank, however the rank ends; and a stop signal sent
    to the whole process group (a terminal's Ctrl-C, `timeout`, a process manager) is left to the rank, which
    needs its workers until it has stopped at the agreed step."""
    import ctypes
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def normalise(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 NCHW on the device -> normalised float32, in the layout the model runs in."""
    x = images.float().sub_(PIXEL_MEAN).div_(PIXEL_STD)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
