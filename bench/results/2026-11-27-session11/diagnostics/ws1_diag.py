# Session 11: why does the one-GPU fused path give other gradients than cuDNN's BatchNorm?
import os, torch, torch.nn.functional as F
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
from resnet_ddp.syncbn import SyncBatchNorm
torch.manual_seed(0)
for shape, res, fmt in [((8, 64, 16, 16), False, torch.contiguous_format), ((8, 64, 16, 16), True, torch.contiguous_format),
                        ((8, 64, 16, 16), True, torch.channels_last), ((8, 2048, 2, 2), True, torch.contiguous_format)]:
    layer = SyncBatchNorm(shape[1]).cuda()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5); layer.bias.uniform_(-0.5, 0.5)
    x0 = torch.randn(shape, device="cuda").contiguous(memory_format=fmt)
    r0 = torch.randn(shape, device="cuda").contiguous(memory_format=fmt) if res else None
    g = torch.randn(shape, device="cuda")
    outs = {}
    for name in ("ref", "fused"):
        x = x0.clone().requires_grad_(); r = r0.clone().requires_grad_() if res else None
        w = layer.weight.detach().clone().requires_grad_(); b = layer.bias.detach().clone().requires_grad_()
        if name == "ref":
            y = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
            y = F.relu(y + r if res else y)
        else:
            layer.weight.grad = layer.bias.grad = None
            y = layer(x, residual=r, relu=True)
            print("  grad_fn", type(y.grad_fn).__name__)
        (y * g).sum().backward()
        if name == "fused":
            w, b = layer.weight, layer.bias
        outs[name] = [y.detach(), x.grad, w.grad, b.grad] + ([r.grad] if res else [])
    print(shape, res, fmt, [f"{(a - b).abs().max().item():.2e}" for a, b in zip(outs["ref"], outs["fused"])])
