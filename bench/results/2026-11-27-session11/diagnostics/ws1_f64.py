# Session 11: one ResNet-50 step at world size 1 (batch 8, 64 px, as the test), gradients against a float64 reference:
# torchvision's blocks with cuDNN's BatchNorm (fp32) and ours with the fused kernel (fp32), each against float64.
import copy, os, sys
sys.path[:0] = ["."]
os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
import torch, torchvision
from resnet_ddp.blocks import hand_relu_to_batchnorm
from resnet_ddp.syncbn import convert_sync_batchnorm
torch.backends.cudnn.deterministic = True
for arch, batch, size in (("resnet50", 8, 64), ("resnet50", 32, 112), ("resnet18", 8, 64)):
    torch.manual_seed(0)
    base = convert_sync_batchnorm(getattr(torchvision.models, arch)(num_classes=10)).cuda()
    x = torch.randn(batch, 3, size, size, device="cuda"); y = torch.randint(0, 10, (batch,), device="cuda")
    grads = {}
    for name in ("f64", "cudnn", "fused"):
        model = copy.deepcopy(base)
        if name == "f64":
            model = model.double()
        if name == "fused":
            model = hand_relu_to_batchnorm(model)
        loss = torch.nn.functional.cross_entropy(model(x.double() if name == "f64" else x), y)
        loss.backward()
        grads[name] = {n: p.grad.double() for n, p in model.named_parameters()}
    for n in ("conv1.weight", "layer1.0.conv1.weight", "layer4.2.conv3.weight" if arch == "resnet50" else "layer4.1.conv2.weight", "fc.weight"):
        ref = grads["f64"][n]
        rel = {k: ((grads[k][n] - ref).norm() / ref.norm()).item() for k in ("cudnn", "fused")}
        print(f"{arch} b{batch} {size}px {n:24s} |g| {ref.norm().item():.3e}  rel err cudnn {rel['cudnn']:.2e} fused {rel['fused']:.2e}", flush=True)
