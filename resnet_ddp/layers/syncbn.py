"""SyncBatchNorm with the maths of torch.nn.SyncBatchNorm, no host sync, and a CPU path.

Why our own: the stock layer refuses CPU tensors (so the CPU test suite could not
run it over gloo), and its forward drops empty-input ranks with boolean-mask
indexing, which forces a host-device sync in each of ResNet-50's 53 BatchNorm
layers. Our sampler gives every rank the same non-zero batch, so that mask is
never needed.

Statistics: each rank computes its per-channel mean and invstd, they are
all-gathered with the element counts, and the global mean and variance are
combined from them (the same reduction as the stock layer). The backward pass
all-reduces sum(dy) and sum(dy * (x - mean)). On the GPUs of one node both
exchanges can go through symmetric memory instead of NCCL (syncbn_symm.py).

The layer can also take the residual add and ReLU that follow it in ResNet's
blocks (blocks.py hands them over); in fp32 on GPUs it then applies all three in
one jitted kernel. Where its output feeds the next block twice (main path and
residual), it returns it twice, and its backward sums the two gradients inside
ReLU's backward, again in one jitted kernel.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _gather_stats(local: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """All-gather a 1-D stats vector from every rank into a (world_size, len) tensor."""
    if world_size == 1:  # one GPU running the fused kernel: nothing to exchange
        return local.view(1, -1)
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        parts: List[torch.Tensor] = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local, group=group)
        return torch.stack(parts)
    gathered = torch.empty((world_size, local.numel()), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(gathered, local, group=group)
    return gathered


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """The CPU path computes in at least float32, as the CUDA kernels accumulate."""
    return x if x.dtype == torch.float64 else x.float()


def _local_stats(x: torch.Tensor, eps: float):
    if x.is_cuda:
        return torch.batch_norm_stats(x, eps)
    xf = _upcast(x)
    var, mean = torch.var_mean(xf, dim=[0, 2, 3], unbiased=False)
    return mean, torch.rsqrt(var + eps)


def _global_stats(x, mean_all, invstd_all, count_all, running_mean, running_var, momentum, eps):
    """Combine per-rank statistics; update the running buffers like the stock layer."""
    if x.is_cuda:
        return torch.batch_norm_gather_stats_with_counts(
            x, mean_all, invstd_all, running_mean, running_var, momentum, eps, count_all
        )
    counts = count_all.view(-1, 1)
    total = counts.sum()
    mean = (mean_all * counts).sum(0) / total
    var_all = invstd_all.reciprocal().square() - eps
    var = ((var_all + (mean_all - mean).square()) * counts).sum(0) / total
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        unbiased = var * total / (total - 1)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return mean, torch.rsqrt(var + eps)


def _functional_collectives():
    """torch's traceable collectives (torch.compile records them in its graph), or None where we do not use them.

    torch 2.2's dynamo cannot pass a process group into an autograd.Function
    (checked: it fails to trace), so before 2.5 torch.compile runs the fused path
    with graph breaks instead; the traceable path is tested on 2.14.
    """
    # entry/resolve.py's --fast reads the same gate from torch's package metadata, without importing torch.
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 5):
        return None
    try:
        from torch.distributed import _functional_collectives as fc
    except ImportError:
        return None
    return fc if hasattr(fc, "all_gather_tensor") and hasattr(fc, "all_reduce") else None


_FC = _functional_collectives()
# The compiled layer gathers its forward statistics by an all-reduce (the form that symmetric memory's
# one-shot kernel takes) instead of an all-gather; set by use_symmetric_memory. Over NCCL the all-gather is faster.
STATS_BY_ALL_REDUCE = False


def symmetric_memory_missing() -> Optional[str]:
    """Why this torch cannot run SyncBatchNorm's compiled all-reduces on symmetric memory, or None."""
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config
        from torch.distributed import _symmetric_memory
    except ImportError as exc:
        return f"torch {torch.__version__} lacks {exc.name}"
    needs = {
        "torch._inductor.config._collective.auto_select": hasattr(
            getattr(inductor_config, "_collective", None), "auto_select"
        ),
        "torch._functorch.config.force_non_lazy_backward_lowering": hasattr(
            functorch_config, "force_non_lazy_backward_lowering"
        ),
        "torch.distributed._symmetric_memory.enable_symm_mem_for_group": hasattr(
            _symmetric_memory, "enable_symm_mem_for_group"
        ),
    }
    missing = [name for name, present in needs.items() if not present]
    return f"torch {torch.__version__} lacks {', '.join(missing)}" if missing else None


def enable_symmetric_memory(group) -> None:
    """Enable symmetric memory for `group` where this torch asks for it (newer ones enable it unasked)."""
    import warnings

    from torch.distributed import _symmetric_memory

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # newer torch: deprecated, as it needs no enabling
        if hasattr(_symmetric_memory, "enable_symm_mem_for_group"):
            _symmetric_memory.enable_symm_mem_for_group(group.group_name)


def use_symmetric_memory(group) -> None:
    """Let inductor lower compiled SyncBatchNorm's all-reduces to symmetric-memory one-shot kernels.

    Each rank reads its peers' buffers directly over NVLink in one kernel (no
    multicast), instead of NCCL's ring: so only for GPUs of one node with peer
    access. Inductor's auto-select does it for all-reduces of up to 128 KiB in
    groups with symmetric memory enabled: the forward's carry a row of statistics
    per rank (2-64 KiB a layer at 4 GPUs), the backward's 0.5-16 KiB. Call before
    torch.compile traces the model.
    """
    global STATS_BY_ALL_REDUCE
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    enable_symmetric_memory(group)
    inductor_config._collective.auto_select = True
    # Each comm buffer's alloc_id is drawn from Python's random at code generation, and dynamo restores
    # that state after compiling a frame: a backward lowered lazily, at the first backward(), drew the
    # ids of the forward's buffers, one of which the forward keeps alive for the backward (torch 2.11).
    functorch_config.force_non_lazy_backward_lowering = True
    # DDP's subgraphs of the same structure would share one cached module, and so its alloc_ids.
    inductor_config.fx_graph_cache = False
    STATS_BY_ALL_REDUCE = True


class _TraceableSyncBatchNorm(torch.autograd.Function):
    """The same statistics and gradients in plain tensor ops and functional collectives, for torch.compile.

    The compiler turns each pass into one fused kernel (a Welford reduction for
    the statistics, the normalisation with its neighbours such as ReLU). Every
    rank has the same batch size (the sampler pads to whole batches), so the
    global statistics are plain means over the ranks. Returns the output and the
    detached global mean and biased variance (for the running statistics).

    Both passes apply per-channel factors to the input itself (out = x * a + b),
    so the backward shares no full-size intermediate with the forward. Written as
    (x - mean) * a, the compiler merged the two passes' subtractions into one
    node and kept it for the backward: a float32 copy of every BatchNorm input,
    written and read again, which made the compiled step slower and larger.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, rank, world_size):
        var, mean = torch.var_mean(_upcast(x), dim=(0, 2, 3), unbiased=False)
        local = torch.cat([mean, var])
        if STATS_BY_ALL_REDUCE:
            # The all-gather as an all-reduce, the form symmetric memory's one-shot kernel takes: each rank
            # fills its own row and leaves the others zero, and adding zeros is exact. (Centring the sums on
            # the running mean instead gave wrong gradients under inductor: its backward read the buffer
            # after the in-place update.)
            rows = F.pad(local, (rank * local.numel(), (world_size - 1 - rank) * local.numel()))
            gathered = _FC.all_reduce(rows, "sum", group)
        else:
            gathered = _FC.all_gather_tensor(local, 0, group)
        gathered = gathered.view(world_size, 2, -1)
        means, variances = gathered[:, 0], gathered[:, 1]
        global_mean = means.mean(0)
        global_var = (variances + (means - global_mean).square()).mean(0)
        invstd = torch.rsqrt(global_var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -global_mean * scale if bias is None else bias - global_mean * scale
        out = x * _shape(scale) + _shape(shift)  # float32: the input is promoted inside the fused kernel
        ctx.save_for_backward(x, weight, global_mean, invstd)
        ctx.group, ctx.world_size = group, world_size
        ctx.mark_non_differentiable(global_mean, global_var)
        # Converted only where the dtypes differ: on torch 2.11 (not 2.14), a Function output made by a
        # no-op .to() left every gradient before the layer at zero under torch.compile (fp32 runs).
        return (out if out.dtype == x.dtype else out.to(x.dtype)), global_mean, global_var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        dy = _upcast(grad_out)
        sum_dy = dy.sum(dim=(0, 2, 3))
        # sum(dy * (x - mean)), from the input itself (see the class docstring)
        sum_dy_xmu = (dy * x).sum(dim=(0, 2, 3)) - mean * sum_dy
        grad_weight = sum_dy_xmu * invstd if weight is not None else None  # this rank's: DDP all-reduces it
        grad_bias = sum_dy if weight is not None else None
        global_sums = _FC.all_reduce(torch.cat([sum_dy, sum_dy_xmu]), "sum", ctx.group)
        total = x.numel() // x.shape[1] * ctx.world_size
        mean_dy, mean_dy_xmu = (global_sums / total).chunk(2)
        scale = invstd if weight is None else invstd * weight
        # (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * scale, as dy * scale + x * a + b
        a = -scale * invstd.square() * mean_dy_xmu
        b = -scale * mean_dy - a * mean
        grad_input = dy * _shape(scale) + x * _shape(a) + _shape(b)
        if weight is not None:
            grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
        return grad_input.to(x.dtype), grad_weight, grad_bias, None, None, None, None


def _traceable_sync_batch_norm(x, weight, bias, running_mean, running_var, eps, momentum, group, world_size):
    rank = dist.get_rank(group)
    out, mean, var = _TraceableSyncBatchNorm.apply(x, weight, bias, eps, group, rank, world_size)
    if running_mean is not None:
        total = x.numel() // x.shape[1] * world_size
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (total / (total - 1))).to(running_var.dtype), momentum)
    return out


def _compiling_check():
    """torch's 'am I being traced by torch.compile' test, looked up once (dynamo cannot trace the lookup).

    torch.compiler.is_compiling from torch 2.3; torch._dynamo.is_compiling before.
    """
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling
    try:
        from torch._dynamo import is_compiling
    except ImportError:
        return lambda: False
    return is_compiling


_is_compiling = _compiling_check()


def _shape(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


# The fp32 GPU path's normalisation, residual add and ReLU in one elementwise kernel, which torch's jiterator
# compiles at run time with NVRTC (no C compiler needed). Unfused, the add and the ReLU read and write the
# activation again: the forward passes over a bottleneck's last activation fall from eight to four. Same
# expression as torch.batch_norm_elemt's; the ReLU lets NaN through, as torch.relu does.
_BN_RELU = (
    "template <typename T> T bn_relu(T x, T mean, T invstd, T w, T b) {"
    " T y = w * (x - mean) * invstd + b; return y < T(0) ? T(0) : y; }"
)
_BN_ADD_RELU = (
    "template <typename T> T bn_add_relu(T x, T residual, T mean, T invstd, T w, T b) {"
    " T y = w * (x - mean) * invstd + b + residual; return y < T(0) ? T(0) : y; }"
)
# ReLU's backward of an output that forked (the next block's main path and its residual, blocks.py): the two
# gradients summed where the output was positive, as threshold_backward(a + b, out, 0) gives, in one pass
# instead of autograd's add and then ReLU's backward.
_RELU_GRAD_OF_SUM = "template <typename T> T relu_grad_of_sum(T a, T b, T out) { return out > T(0) ? a + b : T(0); }"


@functools.lru_cache(maxsize=None)
def _jitted(code: str):
    from torch.cuda import jiterator

    use_a_writable_kernel_cache()
    return jiterator._create_jit_fn(code)


def build_fused_kernels(device: torch.device) -> None:
    """Have torch compile every jitted kernel the one-GPU fused path runs, into its kernel cache.

    A helper process runs this while a rank starts (entry/kernel_prebuild.py): the rank's first step then
    loads the kernels instead of compiling them. The layouts are training's: the normalisation reads its
    factors broadcast over a contiguous activation, the ReLU's backward two contiguous gradients of one
    layout; jiterator compiles one kernel per such case, whatever the sizes.
    """
    layer = SyncBatchNorm(8).to(device)  # no process group: world size 1, the fused path
    x = torch.randn(2, 8, 4, 4, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    residual = torch.randn_like(x).requires_grad_()
    main, forked = layer(x, residual, relu=True, fork=True)  # normalisation, add and ReLU
    out = layer(x, relu=True)  # normalisation and ReLU
    for output in (main, forked, out):
        # Its gradient contiguous in x's layout, as the next block hands it back. Set by a hook under a scalar's
        # backward: gradients handed to backward() would import sympy, seconds of this helper's start.
        output.register_hook(lambda grad: torch.randn_like(x))
    (main.sum() + forked.sum() + out.sum()).backward()
    torch.cuda.synchronize(device)


def use_a_writable_kernel_cache() -> None:
    """Point torch's cache of jitted kernels at the temp dir where its default place cannot be made.

    torch keeps them in $PYTORCH_KERNEL_CACHE_PATH, else $XDG_CACHE_HOME/torch/kernels, else
    $HOME/.cache/torch/kernels. In a container whose home is read-only or unset, each rank would warn
    at its first step and compile the kernels anew at every start. A path the user set is kept, and made
    if missing: torch would not make it, and would warn in every rank and cache nothing.
    """
    if os.environ.get("USE_PYTORCH_KERNEL_CACHE") == "0":
        return
    if "PYTORCH_KERNEL_CACHE_PATH" in os.environ:
        _writable_dir(os.environ["PYTORCH_KERNEL_CACHE_PATH"])
        return
    xdg, home = os.environ.get("XDG_CACHE_HOME"), os.environ.get("HOME")
    default = os.path.join(xdg, "torch") if xdg else os.path.join(home, ".cache", "torch") if home else None
    if default is not None and _writable_dir(os.path.join(default, "kernels")):
        return
    fallback = os.path.join(tempfile.gettempdir(), f"torch-kernels-{os.getuid()}")
    if _writable_dir(fallback):
        os.environ["PYTORCH_KERNEL_CACHE_PATH"] = fallback


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.R_OK | os.W_OK | os.X_OK)


def fuses_in_one_kernel(device: torch.device, amp: str, compiled: bool) -> bool:
    """Whether training steps will run the jitted kernel: the conditions of _one_kernel, known at start-up.

    Otherwise the layer adds and applies ReLU after torch's own kernels (mixed precision, CPUs), or
    inductor fuses them (compiled).
    """
    return device.type == "cuda" and torch.version.hip is None and amp == "off" and not compiled


def _one_kernel(x, residual, weight, bias) -> bool:
    """Whether the jitted kernel applies: float32 throughout (mixed dtypes take its slow casting path)."""
    tensors = [x, weight, bias] + ([residual] if residual is not None else [])
    return (
        x.is_cuda
        and torch.version.hip is None
        and weight is not None
        and bias is not None
        and all(t.dtype == torch.float32 for t in tensors)
    )


def _normalise(x, weight, bias, mean, invstd, eps, residual, relu):
    """(x - mean) * invstd * weight + bias, then + residual, then ReLU: the layer's output."""
    if relu and _one_kernel(x, residual, weight, bias):
        factors = (_shape(mean), _shape(invstd), _shape(weight), _shape(bias))
        if residual is None:
            return _jitted(_BN_RELU)(x, *factors)
        return _jitted(_BN_ADD_RELU)(x, residual, *factors)
    if x.is_cuda:
        out = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
    else:
        out = (_upcast(x) - _shape(mean)) * _shape(invstd)
        if weight is not None:
            out = out * _shape(weight) + _shape(bias)
        out = out.to(x.dtype).contiguous(memory_format=_memory_format(x))
    return _add_relu(out, residual, relu)


def _relu_backward(grads, out):
    """The gradient before the layer's ReLU (`out` is its output; None without a ReLU), from the gradients of
    its one output or, where it forked, of its two."""
    defined = [g for g in grads if g is not None]
    if out is None:
        return defined[0] if len(defined) == 1 else defined[0] + defined[1]
    if len(defined) == 1:
        return torch.ops.aten.threshold_backward(defined[0], out, 0)
    a, b = defined
    if a.is_cuda and torch.version.hip is None and all(t.dtype == torch.float32 for t in (a, b, out)):
        return _jitted(_RELU_GRAD_OF_SUM)(a, b, out)
    return torch.ops.aten.threshold_backward(a + b, out, 0)


def _twice(out, fork):
    """The layer's output, twice where it forks (the next block's main path and residual)."""
    return (out, out) if fork else out


def _add_relu(out, residual, relu):
    """The residual add and ReLU after a BatchNorm, in place as torchvision's blocks do them."""
    if residual is not None:
        out += residual
    return F.relu(out, inplace=True) if relu else out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class _SyncBatchNormFunction(torch.autograd.Function):
    """The layer, and the residual add and ReLU after it when given (ResNet's blocks hand them over)."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        eps,
        momentum,
        group,
        world_size,
        residual=None,
        relu=False,
        slots=None,
        fork=False,
    ):
        x = x.contiguous(memory_format=_memory_format(x))
        channels = x.shape[1]
        mean, invstd = _local_stats(x, eps)
        count = torch.full((1,), x.numel() // channels, dtype=mean.dtype, device=mean.device)
        # Symmetric memory's buffer holds float32, the statistics' type for every input type the GPU kernels take.
        slots = slots if mean.dtype == torch.float32 else None
        if slots is not None:
            gathered = slots.gather([mean, invstd, count])
        else:
            gathered = _gather_stats(torch.cat([mean, invstd, count]), world_size, group)
        mean_all, invstd_all, count_all = torch.split(gathered, [channels, channels, 1], dim=1)
        mean, invstd = _global_stats(
            x, mean_all, invstd_all, count_all.view(-1), running_mean, running_var, momentum, eps
        )
        out = _normalise(x, weight, bias, mean, invstd, eps, residual, relu)
        # The output is kept only for the ReLU's backward, which needs to know where it was zero.
        ctx.save_for_backward(x, weight, mean, invstd, count_all.to(torch.int32).view(-1), out if relu else None)
        ctx.group, ctx.relu, ctx.has_residual, ctx.slots = group, relu, residual is not None, slots
        if fork:
            # Two outputs, one memory: autograd hands the backward each one's gradient rather than adding them
            # first. Nothing writes to either in place.
            ctx.set_materialize_grads(False)
            return out, out.view_as(out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        x, weight, mean, invstd, count_all, out = ctx.saved_tensors
        grad_out = _relu_backward(grads, out)
        memory_format = _memory_format(x)
        grad_out = grad_out.contiguous(memory_format=memory_format)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        channels = x.shape[1]
        if x.is_cuda:
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
                grad_out, x, mean, invstd, weight, need_input, need_weight, need_bias
            )
        else:
            dy = _upcast(grad_out)
            xmu = _upcast(x) - _shape(mean)
            sum_dy = dy.sum(dim=[0, 2, 3])
            sum_dy_xmu = (dy * xmu).sum(dim=[0, 2, 3])
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if need_weight else None
            grad_bias = sum_dy.to(weight.dtype) if need_bias else None
        grad_input = None
        if need_input:
            if ctx.slots is not None and sum_dy.dtype == torch.float32:
                sums = ctx.slots.all_reduce([sum_dy, sum_dy_xmu])
            else:
                sums = torch.cat([sum_dy, sum_dy_xmu])
                if ctx.group is not None:
                    dist.all_reduce(sums, group=ctx.group)
            sum_dy, sum_dy_xmu = torch.split(sums, channels)
            if x.is_cuda:
                grad_input = torch.batch_norm_backward_elemt(
                    grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count_all
                )
            else:
                total = count_all.sum().to(dy.dtype)
                scale = invstd if weight is None else invstd * weight.to(dy.dtype)
                grad_input = (
                    dy - _shape(sum_dy / total) - xmu * _shape(invstd.square() * sum_dy_xmu / total)
                ) * _shape(scale)
                grad_input = grad_input.to(x.dtype).contiguous(memory_format=memory_format)
        if not need_weight:
            grad_weight = None
        if not need_bias:
            grad_bias = None
        # The residual's gradient is the masked one: the add passes it through unchanged.
        grad_residual = grad_out if ctx.has_residual and ctx.needs_input_grad[9] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, grad_residual, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for nn.BatchNorm2d whose training statistics span the whole process group.

    Same parameters and buffers as BatchNorm2d, so a state_dict moves freely
    between the two.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group
        # Its slices of symmetric memory for uncompiled steps, where the job set them up (syncbn_symm.py).
        self.symmetric_slots = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, relu: bool = False, fork: bool = False):
        """The layer's output; with `residual` and `relu`, relu(output + residual) (ResNet's blocks, blocks.py).

        With `fork`, the output twice, as (main, residual) for the next block: the backward then takes the two
        gradients in one kernel with the ReLU's rather than after autograd has added them.
        """
        self._check_input_dim(x)
        # The cumulative average (momentum=None) would need a host read of the
        # batch counter; ResNet uses the default momentum.
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        world_size = dist.get_world_size(self.process_group) if dist.is_available() and dist.is_initialized() else 1
        # One GPU trains through the layer's own fused kernel too where it applies (fp32, a ReLU handed
        # over): it beats cuDNN's BatchNorm followed by a separate add and ReLU (PERFORMANCE.md).
        one_gpu_fused = (
            world_size == 1
            and self.training
            and relu
            and not _is_compiling()
            and _one_kernel(x, residual, self.weight, self.bias)
        )
        if not self.training or (world_size == 1 and not one_gpu_fused):
            return _twice(
                _add_relu(
                    F.batch_norm(
                        x,
                        self.running_mean,
                        self.running_var,
                        self.weight,
                        self.bias,
                        self.training or not self.track_running_stats,
                        momentum,
                        self.eps,
                    ),
                    residual,
                    relu,
                ),
                fork,
            )
        group = (self.process_group or dist.group.WORLD) if world_size > 1 else None  # one GPU: nothing to exchange
        if _is_compiling() and _FC is not None:  # inductor fuses the add and ReLU itself (never at one GPU here)
            return _twice(
                _add_relu(
                    _traceable_sync_batch_norm(
                        x,
                        self.weight,
                        self.bias,
                        self.running_mean if self.track_running_stats else None,
                        self.running_var if self.track_running_stats else None,
                        self.eps,
                        momentum,
                        group,
                        world_size,
                    ),
                    residual,
                    relu,
                ),
                fork,
            )
        return _SyncBatchNormFunction.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.eps,
            momentum,
            group,
            world_size,
            residual,
            relu,
            self.symmetric_slots,
            fork,
        )


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm2d in a module tree by SyncBatchNorm, keeping its state."""
    if isinstance(module, nn.BatchNorm2d):
        converted = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
        )
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
