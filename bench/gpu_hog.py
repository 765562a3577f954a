"""A noisy neighbour: keep one GPU busy with matmuls for a while, from a second process.

The GPU then time-slices between this process and the job's, so the job's rank
on that GPU computes at about half speed: what a degraded or shared GPU looks
like. bench/preflight_check.py uses it to check that the preflight and the
straggler detector name that GPU.

    python bench/gpu_hog.py --gpu 1 --seconds 60

Prints one line when the GPU is busy (others may wait for it) and one when done.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, default=1, help="CUDA index of the GPU to keep busy")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long")
    parser.add_argument("--size", type=int, default=8192, help="side of the square bf16 matrices")
    args = parser.parse_args()
    if args.gpu >= torch.cuda.device_count():
        print(f"gpu_hog: no GPU {args.gpu} ({torch.cuda.device_count()} visible)", file=sys.stderr)
        return 2
    device = torch.device("cuda", args.gpu)
    torch.cuda.set_device(device)
    dtype = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    a = torch.randn(args.size, args.size, device=device, dtype=dtype)
    b = torch.randn(args.size, args.size, device=device, dtype=dtype)
    out = torch.empty_like(a)
    torch.mm(a, b, out=out)
    torch.cuda.synchronize(device)
    print(f"gpu_hog: GPU {args.gpu} busy for {args.seconds:g} s", flush=True)
    products, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for _ in range(20):  # a short queue, so that the loop notices the time and stops promptly
            torch.mm(a, b, out=out)
        torch.cuda.synchronize(device)
        products += 20
    elapsed = time.perf_counter() - start
    print(f"gpu_hog: done, {2 * args.size**3 * products / elapsed / 1e12:.1f} TFLOP/s over {elapsed:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
