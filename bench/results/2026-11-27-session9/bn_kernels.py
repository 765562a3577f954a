# Session 9, call 0 (1 x H100 80GB HBM3, torch 2.11.0+cu130): the script exactly as it ran, kept with its
# output (bnk-fp32.txt: `python bn_kernels.py 64 fp32`; bnk-bf16.txt: `... 256 bf16`). Its last column,
# labelled "GB/s-equiv", is bytes / ms / 1e9, that is TB/s rounded to a whole number. Its jitted bn_relu and
# bn_add_relu strings are those of resnet_ddp/syncbn.py at commit time.
"""Microbenchmark: ResNet-50's 53 BatchNorm layers (channels_last), native kernels against alternatives."""
import sys
import torch
from torch.cuda import jiterator

torch.manual_seed(0)
dev = torch.device("cuda")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 64
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2] if len(sys.argv) > 2 else "fp32"]

# (C, H, kind): kind r = BN then ReLU, a = BN then add then ReLU, n = BN alone (downsample)
L = [(64, 112, "r")]
for C, H, Hin, blocks in [(64, 56, 56, 3), (128, 28, 56, 4), (256, 14, 28, 6), (512, 7, 14, 3)]:
    for b in range(blocks):
        L.append((C, Hin if b == 0 else H, "r"))
        L.append((C, H, "r"))
        L.append((4 * C, H, "a"))
        if b == 0:
            L.append((4 * C, H, "n"))
assert len(L) == 53

def t(C, H):
    return torch.randn(N, C, H, H, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)

X = [t(C, H) for C, H, _ in L]
ID = [t(C, H) for C, H, _ in L]
DY = [t(C, H) for C, H, _ in L]
P = [tuple(torch.rand(C, device=dev) + 0.5 for _ in range(4)) for C, _, _ in L]  # mean, invstd, w, b
nbytes = sum(x.numel() for x in X) * X[0].element_size()
print(f"N={N} {dtype} one pass over all BN tensors: {nbytes/1e9:.2f} GB", flush=True)

bn_relu = jiterator._create_jit_fn(
    "template <typename T> T bn_relu(T x, T mean, T invstd, T w, T b) {"
    " T y = w * (x - mean) * invstd + b; return y < T(0) ? T(0) : y; }")
bn_add_relu = jiterator._create_jit_fn(
    "template <typename T> T bn_add_relu(T x, T r, T mean, T invstd, T w, T b) {"
    " T y = w * (x - mean) * invstd + b + r; return y < T(0) ? T(0) : y; }")
ss_relu = jiterator._create_jit_fn(
    "template <typename T> T ss_relu(T x, T scale, T shift) {"
    " T y = x * scale + shift; return y < T(0) ? T(0) : y; }")
bn_bwd = jiterator._create_jit_fn(
    "template <typename T> T bn_bwd(T dz, T x, T mean, T invstd, T w, T mdy, T mdyxmu) {"
    " return (dz - mdy - (x - mean) * invstd * invstd * mdyxmu) * invstd * w; }")
sh = lambda v: v.view(1, -1, 1, 1)


def timeit(name, fn, passes, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    ms = s.elapsed_time(e) / reps
    print(f"{name:44s} {ms:7.3f} ms  {passes * nbytes / ms / 1e9:6.0f} GB/s-equiv ({passes} passes)", flush=True)
    return ms


eps = 1e-5
def stats_native():
    for x in X:
        torch.batch_norm_stats(x, eps)
def stats_var_mean():
    for x in X:
        v, m = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        torch.rsqrt(v + eps)
def stats_var_mean_2d():
    for x in X:
        x2 = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        v, m = torch.var_mean(x2, dim=0, unbiased=False)
        torch.rsqrt(v + eps)
def stats_sums():
    for x in X:
        x2 = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        s = x2.sum(0, dtype=torch.float32)
        q = torch.linalg.vector_norm(x2, dim=0, dtype=torch.float32)
def fwd_native():
    for x, (m, i, w, b), (_, _, k) in zip(X, P, L):
        y = torch.batch_norm_elemt(x, w, b, m, i, eps)
        if k != "n":
            y.relu_()
def fwd_native_add():
    for x, r, (m, i, w, b), (_, _, k) in zip(X, ID, P, L):
        y = torch.batch_norm_elemt(x, w, b, m, i, eps)
        if k == "a":
            y.add_(r)
        if k != "n":
            y.relu_()
def fwd_jit():
    for x, r, (m, i, w, b), (_, _, k) in zip(X, ID, P, L):
        if k == "r":
            bn_relu(x, sh(m), sh(i), sh(w), sh(b))
        elif k == "a":
            bn_add_relu(x, r, sh(m), sh(i), sh(w), sh(b))
        else:
            torch.batch_norm_elemt(x, w, b, m, i, eps)
def fwd_jit_ss():
    for x, r, (m, i, w, b), (_, _, k) in zip(X, ID, P, L):
        scale = i * w
        shift = b - m * scale
        if k == "r":
            ss_relu(x, sh(scale), sh(shift))
        else:
            torch.batch_norm_elemt(x, w, b, m, i, eps)
def elemt_only():
    for x, (m, i, w, b) in zip(X, P):
        torch.batch_norm_elemt(x, w, b, m, i, eps)
def relu_only():
    for x in X:
        torch.relu(x)
def bwd_native():
    for dy, x, (m, i, w, b) in zip(DY, X, P):
        sdy, sdyx, gw, gb = torch.batch_norm_backward_reduce(dy, x, m, i, w, True, True, True)
        cnt = torch.full((2,), N * x.shape[2] * x.shape[3] // 2, dtype=torch.int32, device=dev)
        torch.batch_norm_backward_elemt(dy, x, m, i, w, sdy, sdyx, cnt)
def bwd_reduce_native():
    for dy, x, (m, i, w, b) in zip(DY, X, P):
        torch.batch_norm_backward_reduce(dy, x, m, i, w, True, True, True)
def bwd_elemt_native():
    for dy, x, (m, i, w, b) in zip(DY, X, P):
        torch.batch_norm_backward_elemt(dy, x, m, i, w, m, i, CNT[x.shape[1]])
def bwd_elemt_jit():
    for dy, x, (m, i, w, b) in zip(DY, X, P):
        bn_bwd(dy, x, sh(m), sh(i), sh(w), sh(m), sh(b))
def thr_bwd():
    for dy, x in zip(DY, X):
        torch.ops.aten.threshold_backward(dy, x, 0)
CNT = {x.shape[1]: torch.full((2,), 1000, dtype=torch.int32, device=dev) for x in X}

r = {}
r["stats_native"] = timeit("batch_norm_stats", stats_native, 1)
r["stats_var_mean"] = timeit("var_mean (0,2,3) + rsqrt", stats_var_mean, 1)
r["stats_var_mean_2d"] = timeit("var_mean on [NHW, C] view + rsqrt", stats_var_mean_2d, 1)
r["stats_sums"] = timeit("sum + vector_norm on [NHW, C] (2 reads)", stats_sums, 2)
r["elemt"] = timeit("batch_norm_elemt", elemt_only, 2)
r["relu"] = timeit("relu (out of place)", relu_only, 2)
r["fwd_native"] = timeit("fwd apply: elemt + relu_ (no add)", fwd_native, 4)
r["fwd_native_add"] = timeit("fwd apply: elemt + add_ + relu_", fwd_native_add, 5)
r["fwd_jit"] = timeit("fwd apply: jiterator bn_relu / bn_add_relu", fwd_jit, 2)
r["fwd_jit_ss"] = timeit("fwd apply: jiterator scale-shift relu (no add)", fwd_jit_ss, 2)
r["bwd_reduce"] = timeit("backward_reduce", bwd_reduce_native, 2)
r["bwd_elemt"] = timeit("backward_elemt", bwd_elemt_native, 3)
r["bwd_elemt_jit"] = timeit("jiterator backward elemt", bwd_elemt_jit, 3)
r["thr_bwd"] = timeit("threshold_backward", thr_bwd, 3)

# correctness of the jitted kernels against the native ones
x, (m, i, w, b) = X[5], P[5]
ref = torch.batch_norm_elemt(x, w, b, m, i, eps).relu_()
got = bn_relu(x, sh(m), sh(i), sh(w), sh(b))
print("bn_relu max abs diff", (ref - got).abs().max().item(), "channels_last out:",
      got.is_contiguous(memory_format=torch.channels_last), got.dtype)
ref = torch.batch_norm_elemt(x, w, b, m, i, eps).add_(ID[5]).relu_()
got = bn_add_relu(x, ID[5], sh(m), sh(i), sh(w), sh(b))
print("bn_add_relu max abs diff", (ref - got).abs().max().item())
v, mu = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
mn, inv = torch.batch_norm_stats(x, eps)
print("var_mean vs batch_norm_stats: mean", (mu - mn).abs().max().item(), "invstd",
      (torch.rsqrt(v + eps) - inv).abs().max().item(), flush=True)
# CUDA graph capture of a jitted kernel
g = torch.cuda.CUDAGraph()
xs = x.clone()
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    out = bn_relu(xs, sh(m), sh(i), sh(w), sh(b))
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g):
    out = bn_relu(xs, sh(m), sh(i), sh(w), sh(b))
xs.copy_(X[5] * 2)
g.replay()
torch.cuda.synchronize()
ref = torch.batch_norm_elemt(xs, w, b, m, i, eps).relu_()
print("graph replay of jitted kernel, max abs diff", (out - ref).abs().max().item())
