"""SyncBatchNorm's 106 small collectives of a ResNet-50 step, NCCL against symmetric memory's one-shot
all-reduce, each set captured in one CUDA graph and replayed (as the default step runs them).

    python symm_bench.py   # on 2 GPUs; prints ms per replay of the whole set
"""
import os, socket, time
import torch, torch.distributed as dist, torch.multiprocessing as mp
import torchvision

def channels():
    m = torchvision.models.resnet50(num_classes=100)
    return [b.num_features for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]

def timed(graph, n=300):
    for _ in range(20): graph.replay()
    torch.cuda.synchronize(); dist.barrier(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1000

def worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    import torch.distributed._symmetric_memory as symm
    group = dist.group.WORLD
    symm.enable_symm_mem_for_group(group.group_name)
    cs = channels()
    locals_f = [torch.randn(2 * c + 1, device="cuda") + rank for c in cs]
    locals_b = [torch.randn(2 * c, device="cuda") * (rank + 1) for c in cs]
    fwd_total = sum(world * (2 * c + 1) for c in cs); bwd_total = sum(2 * c for c in cs)
    buf = symm.empty(fwd_total + bwd_total, dtype=torch.float32, device="cuda")
    symm.rendezvous(buf, group.group_name)
    buf.zero_()
    views_f, views_b, off = [], [], 0
    for c in cs:
        views_f.append(buf[off: off + world * (2 * c + 1)].view(world, 2 * c + 1)); off += world * (2 * c + 1)
    for c in cs:
        views_b.append(buf[off: off + 2 * c]); off += 2 * c
    torch.cuda.synchronize(); dist.barrier()
    s = torch.cuda.Stream()
    def nccl_set():
        outs = []
        for l in locals_f:
            g = torch.empty((world, l.numel()), device="cuda"); dist.all_gather_into_tensor(g, l); outs.append(g)
        for l in locals_b:
            r = l.clone(); dist.all_reduce(r); outs.append(r)
        return outs
    def symm_set():
        outs = []
        for l, v in zip(locals_f, views_f):
            v[rank].copy_(l); outs.append(torch.ops.symm_mem.one_shot_all_reduce(v, "sum", group.group_name))
        for l, v in zip(locals_b, views_b):
            v.copy_(l); outs.append(torch.ops.symm_mem.one_shot_all_reduce(v, "sum", group.group_name))
        return outs
    results = {}
    for name, fn in (("nccl", nccl_set), ("symm", symm_set)):
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3): fn()
        torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize(); dist.barrier()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = fn()
        results[name] = (timed(g), outs)
    same = all(torch.equal(a, b) for a, b in zip(results["nccl"][1], results["symm"][1]))
    eager = {}
    for name, fn in (("nccl", nccl_set), ("symm", symm_set)):
        torch.cuda.synchronize(); dist.barrier()
        t = time.perf_counter()
        for _ in range(50): fn()
        torch.cuda.synchronize(); eager[name] = (time.perf_counter() - t) / 50 * 1000
    if rank == 0:
        print(f"{len(cs)} layers, world {world}: graphed ms per step-set: nccl {results['nccl'][0]:.3f}, "
              f"symm one-shot {results['symm'][0]:.3f}; eager: nccl {eager['nccl']:.3f}, symm {eager['symm']:.3f}; "
              f"identical results: {same}", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    world = torch.cuda.device_count()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]
    mp.spawn(worker, args=(world, port), nprocs=world)
