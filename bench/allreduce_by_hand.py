"""All-reduce bandwidth by hand, with nccl-tests' definitions, through torch.distributed directly.

The reference that bench/preflight_check.py sets beside the job's own preflight
figures when nccl-tests' all_reduce_perf is not on PATH. It shares no code with
resnet_ddp/preflight.py on purpose, and times as all_reduce_perf does by
default: float32 sum, 5 warm-up and 20 timed all-reduces per size, 1 MiB to
1 GiB by factors of 4, host clock around the timed loop after a barrier,
waiting for the GPU at the end.

    python bench/allreduce_by_hand.py --gpus 4 --out allreduce-x4.json

algbw = bytes / time; busbw = algbw * 2 (n - 1) / n. Each rank's mean time is
reported, and the figures are given for the slowest rank's time (as the job's
preflight reports) and for the mean of the ranks' times (nccl-tests' default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [2**20 * 4**k for k in range(6)]
WARMUP, ITERS = 5, 20


def _worker(local_rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", rank=local_rank, world_size=world_size)
    rows = []
    for size in SIZES:
        buffer = torch.zeros(size // 4, dtype=torch.float32, device="cuda")
        for _ in range(WARMUP):
            dist.all_reduce(buffer)
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(ITERS):
            dist.all_reduce(buffer)
        torch.cuda.synchronize()
        mean_s = (time.perf_counter() - start) / ITERS
        times = [None] * world_size
        dist.all_gather_object(times, mean_s)
        factor = 2 * (world_size - 1) / world_size
        slowest, average = max(times), sum(times) / world_size
        rows.append(
            {
                "bytes": size,
                "time_us_per_rank": [t * 1e6 for t in times],
                "time_us_max": slowest * 1e6,
                "algbw_gb_s_max": size / slowest / 1e9,
                "busbw_gb_s_max": size / slowest / 1e9 * factor,
                "time_us_mean": average * 1e6,
                "busbw_gb_s_mean": size / average / 1e9 * factor,
            }
        )
        del buffer
    if local_rank == 0:
        payload = {
            "tool": "bench/allreduce_by_hand.py",
            "gpus": world_size,
            "warmup": WARMUP,
            "iters": ITERS,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0),
            "sizes": rows,
        }
        with open(out, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        for r in rows:
            print(
                f"{r['bytes']:>12d} B  {r['time_us_max']:>10.1f} us  busbw {r['busbw_gb_s_max']:>8.2f} GB/s "
                f"(slowest rank)  {r['busbw_gb_s_mean']:>8.2f} GB/s (mean time)",
                flush=True,
            )
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    if args.gpus < 2 or args.gpus > torch.cuda.device_count():
        print(f"allreduce_by_hand: need 2 to {torch.cuda.device_count()} GPUs, got --gpus {args.gpus}", file=sys.stderr)
        return 2
    mp.spawn(_worker, args=(args.gpus, args.port, args.out), nprocs=args.gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
