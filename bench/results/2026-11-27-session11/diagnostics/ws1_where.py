# Session 11: which ResNet-50 parameters move differently after one step at world size 1, fused against cuDNN's BatchNorm.
import os, sys
sys.path[:0] = [".", "tests"]
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1", NVIDIA_TF32_OVERRIDE="0")
import torchvision
from steps import compare_steps
if __name__ == "__main__":
    names = [n for n, _ in torchvision.models.resnet50(num_classes=10).named_parameters()]
    for steps in (1, 2):
        eager, fused = compare_steps("nccl", "fuse_bn_relu", steps=steps, arch="resnet50", world_size=1)
        diffs = sorted(((a - b).abs().max().item(), n, a.abs().max().item()) for n, a, b in zip(names, eager[0][1], fused[0][1]))
        print(f"steps={steps} losses {eager[0][0].tolist()} {fused[0][0].tolist()}")
        for d, n, m in diffs[-8:]:
            print(f"   {n:40s} diff {d:.3e} (max |w| {m:.3e})")
        print("   median", diffs[len(diffs) // 2][:2], flush=True)
