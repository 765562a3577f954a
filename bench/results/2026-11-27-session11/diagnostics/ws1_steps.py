# Session 11: ResNet-50 at world size 1, torchvision's blocks against ours, with and without the one-GPU fused path.
import os, sys
sys.path[:0] = [".", "tests"]
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1", NVIDIA_TF32_OVERRIDE="0")
from steps import compare_steps
if __name__ == "__main__":
    for unfused in ("1", "0"):
        os.environ["DIAG_UNFUSED"] = unfused
        for arch in ("resnet18", "resnet50"):
            eager, fused = compare_steps("nccl", "fuse_bn_relu", steps=3, arch=arch, world_size=1)
            diffs = [(a - b).abs().max().item() for a, b in zip(eager[0][1], fused[0][1])]
            print(f"unfused={unfused} {arch} losses {eager[0][0].tolist()} {fused[0][0].tolist()} max param diff {max(diffs):.2e}", flush=True)
