"""Preflight: is this node, and the interconnect between its GPUs, healthy? Measured in seconds,
inside the job's own process group, before the model and the data exist.

Every rank measures its device (dense matmul rate, host-to-device copies) and
takes part in an all-reduce sweep; rank 0 also times a write to the save dir,
and the first rank of each host reads /dev/shm. The figures are all-gathered,
so every rank reaches the same verdicts; rank 0 prints one table, names what
looks wrong in WARNING lines and writes <save-dir>/preflight.json.
PREFLIGHT.md defines every figure and every rule.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from resnet_ddp.config import Config
from resnet_ddp.core import distributed
from resnet_ddp.core.data import SHM_PATH, fit_workers_to_shm, host_batch_bytes
from resnet_ddp.core.files import write_json
from resnet_ddp.health.slowdown import TestSlowdown
from resnet_ddp.observe.console import NOTICE
from resnet_ddp.observe.nvml import nvml_uuid

log = logging.getLogger(__name__)

REPORT_NAME = "preflight.json"

# Verdict rules (PREFLIGHT.md explains each).
MATMUL_SHORTFALL = 0.10  # a device more than 10% below the median of its peers (same model) is named
LINK_FRACTION = 1 / 3  # all-reduce bus bandwidth under a third of what the links allow is "far below"
# NVLink bandwidth of one link in each direction, GB/s, by GPU generation (compute capability major),
# from NVIDIA's datasheets (e.g. H100 SXM: 18 links, 900 GB/s both directions together).
NVLINK_GB_S = {
    6: ("P100, NVLink 1", 20.0),
    7: ("V100, NVLink 2", 25.0),
    8: ("A100, NVLink 3", 25.0),
    9: ("H100/H200, NVLink 4", 25.0),
    10: ("B200, NVLink 5", 50.0),
}
# PCIe bandwidth of one lane in each direction after line encoding, GB/s, by PCIe generation.
PCIE_GB_S_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938}

# Sizes and time caps: the whole preflight stays well under 30 s on 2-8 GPUs.
MATMUL_N = {"cuda": 8192, "cpu": 512}
MATMUL_WARMUP = 3
MATMUL_BUDGET_S = 0.25
COPY_BYTES = 64 * 2**20
COPY_BUDGET_S = 0.2
SWEEP_BYTES = {
    "cuda": [2**20 * 4**k for k in range(6)],  # 1 MiB .. 1 GiB, as nccl-tests -b 1M -e 1G -f 4
    "cpu": [2**20 * 4**k for k in range(3)],
}  # 1 MiB .. 16 MiB: gloo through host memory
SWEEP_WARMUP = 2
SWEEP_SIZE_BUDGET_S = 0.25  # timed iterations per size, at least SWEEP_MIN_ITERS
SWEEP_MIN_ITERS, SWEEP_MAX_ITERS = 3, 50
SWEEP_ITER_LIMIT_S = 0.5  # if the next size would take longer than this per all-reduce, stop there
LATENCY_BYTES = 8
LATENCY_ITERS = {"cuda": 200, "cpu": 50}
DISK_BYTES = {"cuda": 256 * 2**20, "cpu": 16 * 2**20}
DISK_CHUNK = 8 * 2**20
DISK_BUDGET_S = 10.0
DISK_PREFIX = ".preflight-write-test-"


def run(config: Config, rank: distributed.RankInfo) -> List[dict]:
    """Every rank: measure, share, judge; rank 0 reports. Returns the findings (the same on every rank)."""
    started = time.perf_counter()
    device = rank.device
    if device.type == "cpu":
        distributed.share_host_cores(rank)
    mine: Dict[str, object] = {"place": distributed.placement(rank), **_device_facts(device)}
    facts = _all_gather(mine, rank.world_size)  # first the ids: NVML needs the peers' to ask about links
    mine["matmul"] = matmul_rate(device, TestSlowdown(config.health.test_slow_rank, rank.rank, device))
    if device.type == "cuda":
        mine["h2d"] = host_to_device_rate(device)
        peers = [f for f in facts if f["place"]["host"] == mine["place"]["host"] and f["place"]["rank"] != rank.rank]
        mine["links"] = gpu_links(device, mine, peers)
    if rank.local_rank == 0:
        mine["shm"] = shm_facts(config, rank.local_world_size)
    sweep, sweep_notes = all_reduce_sweep(rank)
    latency = all_reduce_latency(rank)
    disk = save_dir_write_rate(config.save_dir, DISK_BYTES[device.type]) if rank.is_main else None
    everyone = _all_gather(mine, rank.world_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the sweep's buffers back before the model comes

    report = {
        "mode": config.health.preflight,
        "world_size": rank.world_size,
        "backend": dist.get_backend(),
        "torch": torch.__version__,
        "ranks": everyone,
        "all_reduce": {
            "dtype": "float32",
            "op": "sum",
            "in_place": True,
            "sizes": sweep,
            "latency": latency,
            "time": "mean per all-reduce on the slowest rank",
            "busbw": "algbw * 2 * (n - 1) / n, nccl-tests' bus bandwidth for all-reduce",
        },
        "save_dir_write": disk,
        "notes": sweep_notes + _shm_notes(config, everyone),
    }
    report["link_expectation"] = link_expectation(everyone)
    if "note" in report["link_expectation"]:
        report["notes"].append(report["link_expectation"]["note"])
    findings = judge(report)
    report["findings"] = findings
    report["elapsed_s"] = time.perf_counter() - started
    if rank.is_main:
        path = os.path.join(config.save_dir, REPORT_NAME)
        write_json(path, report)
        for line in format_report(report):
            log.log(NOTICE, line)
        log.log(
            NOTICE, f"preflight: {_count(len(findings), 'finding')} in {report['elapsed_s']:.1f} s; report in {path}"
        )
        if findings and config.health.preflight == "strict":
            log.error(strict_ending(findings, config.save_dir))
    return findings


def strict_ending(findings: List[dict], save_dir: str) -> str:
    """Why a job with --preflight strict ends before training: on stderr, and in summary.json."""
    path = os.path.join(save_dir, REPORT_NAME)
    return f"preflight: {_count(len(findings), 'finding')} with --preflight strict: not training (see {path})"


# ---------------------------------------------------------------- measurements


def _timed(device: torch.device, fn: Callable[[], object], iterations: int) -> float:
    """Seconds for `iterations` calls: CUDA events on a GPU (read after the last), the host clock on CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def _iterations(budget_s: float, one_s: float, low: int, high: int) -> int:
    return max(low, min(high, int(budget_s / one_s) if one_s > 0 else high))


def _precision(device: torch.device) -> Tuple[torch.dtype, str]:
    if device.type != "cuda":
        return torch.float32, "fp32"
    # Compute capability, as the launcher checks --amp bf16: newer torch calls emulated bf16 (V100) support.
    if torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16, "bf16"
    return torch.float16, "fp16"


def matmul_rate(device: torch.device, slowdown: Optional[TestSlowdown] = None) -> dict:
    """Dense n x n matmul rate, TFLOP/s (2 n^3 per product), in the fastest precision the device has."""
    dtype, label = _precision(device)
    n = MATMUL_N[device.type]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def product():
        torch.mm(a, b, out=out)
        if slowdown:
            slowdown.work()

    for _ in range(MATMUL_WARMUP):
        product()
    iterations = _iterations(MATMUL_BUDGET_S, _timed(device, product, 1), 3, 10_000)
    seconds = _timed(device, product, iterations)
    return {
        "tflops": 2 * n**3 * iterations / seconds / 1e12,
        "precision": label,
        "n": n,
        "iterations": iterations,
        "seconds": seconds,
    }


def host_to_device_rate(device: torch.device) -> dict:
    """GB/s of copies from pinned host memory to the device (every GPU of the host copying at once)."""
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)

    def copy():
        target.copy_(source, non_blocking=True)

    copy()
    iterations = _iterations(COPY_BUDGET_S, _timed(device, copy, 1), 2, 100)
    seconds = _timed(device, copy, iterations)
    return {"gb_s": COPY_BYTES * iterations / seconds / 1e9, "bytes": COPY_BYTES, "iterations": iterations}


def bus_bandwidth(size_bytes: int, seconds: float, world_size: int) -> Tuple[float, float]:
    """nccl-tests' figures for an all-reduce: (algbw, busbw) in GB/s.

    algbw = size / time. busbw = algbw * 2 (n - 1) / n: a ring all-reduce sends
    and receives 2 (n - 1) / n of the buffer on each rank's link, so busbw is
    the link bandwidth the operation used, comparable across rank counts.
    """
    algbw = size_bytes / seconds / 1e9
    return algbw, algbw * 2 * (world_size - 1) / world_size


def _agreed_max(value: float, device: torch.device) -> float:
    """The largest of every rank's value; every rank gets it (and can take the same decisions)."""
    box = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return float(box.item())


def all_reduce_sweep(rank: distributed.RankInfo) -> Tuple[List[dict], List[str]]:
    """All-reduce (float32 sum, in place) over the sizes of SWEEP_BYTES, stopped early where too slow."""
    if rank.world_size < 2:
        return [], ["one rank: no all-reduce to measure"]
    device = rank.device
    results, notes = [], []
    for size in SWEEP_BYTES[device.type]:
        buffer = torch.zeros(size // 4, dtype=torch.float32, device=device)

        def reduce(buffer=buffer):  # this size's buffer
            dist.all_reduce(buffer)

        for _ in range(SWEEP_WARMUP):
            reduce()
        one = _agreed_max(_timed(device, reduce, 1), device)  # every rank then runs the same count
        iterations = _iterations(SWEEP_SIZE_BUDGET_S, one, SWEEP_MIN_ITERS, SWEEP_MAX_ITERS)
        seconds = _agreed_max(_timed(device, reduce, iterations) / iterations, device)
        algbw, busbw = bus_bandwidth(size, seconds, rank.world_size)
        results.append(
            {
                "bytes": size,
                "time_us": seconds * 1e6,
                "algbw_gb_s": algbw,
                "busbw_gb_s": busbw,
                "iterations": iterations,
            }
        )
        del buffer
        if size != SWEEP_BYTES[device.type][-1] and 4 * seconds > SWEEP_ITER_LIMIT_S:
            notes.append(
                f"all-reduce sweep stopped after {_size(size)}: the next size would take about "
                f"{4 * seconds:.1f} s per all-reduce"
            )
            break
    return results, notes


def all_reduce_latency(rank: distributed.RankInfo) -> Optional[dict]:
    """Mean time of an 8-byte all-reduce, microseconds, slowest rank (includes torch.distributed's own call cost)."""
    if rank.world_size < 2:
        return None
    device = rank.device
    buffer = torch.zeros(LATENCY_BYTES // 4, dtype=torch.float32, device=device)

    def reduce():
        dist.all_reduce(buffer)

    for _ in range(10):
        reduce()
    iterations = LATENCY_ITERS[device.type]
    seconds = _agreed_max(_timed(device, reduce, iterations) / iterations, device)
    return {"bytes": LATENCY_BYTES, "time_us": seconds * 1e6, "iterations": iterations}


def shm_facts(config: Config, local_processes: int) -> dict:
    """Size and free space of /dev/shm, and how many DataLoader workers per process fit in it."""
    try:
        stats = os.statvfs(SHM_PATH)
    except OSError as exc:
        return {"path": SHM_PATH, "error": exc.strerror or str(exc)}
    free = stats.f_bavail * stats.f_frsize
    facts = {"path": SHM_PATH, "total_bytes": stats.f_blocks * stats.f_frsize, "free_bytes": free}
    training = config.training
    if training.data == "cpu" and training.num_workers > 0:
        batch_bytes = host_batch_bytes(training.batch_size, config.model.image_size)
        facts["loader_workers_that_fit"] = fit_workers_to_shm(training.num_workers, batch_bytes, local_processes, free)[
            0
        ]
    return facts


class _Stopped(Exception):
    """SIGTERM arrived while the write test's file existed."""


def _raise_stopped(signum, _frame):
    raise _Stopped(signum)


def save_dir_write_rate(save_dir: str, size: int) -> dict:
    """MB/s writing `size` bytes of random data to a temporary file in the save dir, fsync included.

    The file is removed whatever happens, a SIGTERM included (then re-raised).
    """
    try:
        stats = os.statvfs(save_dir)
    except OSError as exc:
        return {"path": save_dir, "error": exc.strerror or str(exc)}
    free = stats.f_bavail * stats.f_frsize
    size = min(size, free // 4 // DISK_CHUNK * DISK_CHUNK)
    if size <= 0:
        return {"path": save_dir, "error": f"only {free / 2**20:.0f} MiB free: not written"}
    chunk = memoryview(os.urandom(min(DISK_CHUNK, size)))  # random: a compressing filesystem cannot shortcut it
    try:
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
    except ValueError:  # not the main thread: no handler of ours
        previous = None
    fd, path = None, None
    try:
        fd, path = tempfile.mkstemp(dir=save_dir, prefix=DISK_PREFIX, suffix=".tmp")
        written, start = 0, time.perf_counter()
        while written < size and time.perf_counter() - start < DISK_BUDGET_S:
            written += os.write(fd, chunk[: size - written])
        os.fsync(fd)
        seconds = time.perf_counter() - start
        result = {
            "path": save_dir,
            "bytes": written,
            "seconds": seconds,
            "mb_s": written / seconds / 1e6,
            "fsync": True,
        }
    except OSError as exc:
        result = {"path": save_dir, "error": exc.strerror or str(exc)}
    except _Stopped:
        result = {"path": save_dir, "error": "stopped by SIGTERM"}
    finally:
        if fd is not None:
            os.close(fd)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if "stopped" in result.get("error", ""):
        os.kill(os.getpid(), signal.SIGTERM)  # now with the handler it had: the stop goes on as it would have
    return result


# ---------------------------------------------------------------- GPUs and links


def _device_facts(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu", "capability": None, "uuid": None, "pci_bus_id": None}
    props = torch.cuda.get_device_properties(device)
    uuid = nvml_uuid(device)
    pci = None
    if hasattr(props, "pci_bus_id"):
        pci = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return {"device": props.name, "capability": [props.major, props.minor], "uuid": uuid, "pci_bus_id": pci}


def _nvml_handle(pynvml, facts: dict):
    """NVML's handle for a GPU: by UUID, else by PCI bus id, else by the index the machine gives it."""
    # bytes: older nvidia-ml-py takes no str
    if facts.get("uuid"):
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(facts["uuid"].encode())
        except pynvml.NVMLError:
            pass
    if facts.get("pci_bus_id"):
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(facts["pci_bus_id"].encode())
        except pynvml.NVMLError:
            pass
    gpu = str(facts["place"].get("gpu"))
    if gpu.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
    raise LookupError(f"no NVML handle for GPU {gpu}")


def gpu_links(device: torch.device, mine: dict, peers: List[dict]) -> dict:
    """This GPU's active NVLinks, NVLink P2P to its peers on the host, PCIe link, from NVML.

    Without NVML (no pynvml, no driver library, a MIG slice...) the answer says
    why, and the link check is skipped: never an error.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, or NVML's own error when its library or driver is missing
        return {"available": False, "note": f"NVML unavailable ({_short(exc)}): link check skipped"}
    try:
        handle = _nvml_handle(pynvml, mine)
        active = 0
        for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                active += pynvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED
            except pynvml.NVMLError:  # a link this GPU does not have, or no NVLink at all
                continue
        facts: Dict[str, object] = {"available": True, "nvlinks_active": active}
        try:
            facts["pcie_max"] = [
                pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle),
                pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle),
            ]
            facts["pcie_now"] = [
                pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle),
                pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle),
            ]
        except pynvml.NVMLError:
            pass
        p2p = {}
        for peer in peers:
            try:
                status = pynvml.nvmlDeviceGetP2PStatus(
                    handle, _nvml_handle(pynvml, peer), pynvml.NVML_P2P_CAPS_INDEX_NVLINK
                )
                p2p[str(peer["place"]["rank"])] = status == pynvml.NVML_P2P_STATUS_OK
            except (pynvml.NVMLError, LookupError):
                continue
        facts["nvlink_p2p"] = p2p
        return facts
    except Exception as exc:
        return {
            "available": False,
            "note": f"NVML could not describe GPU {mine['place'].get('gpu')} ({_short(exc)}): link check skipped",
        }
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def link_expectation(ranks: List[dict]) -> dict:
    """What the links between this job's GPUs allow: {link, nominal_gb_s, expected_busbw_gb_s, basis}, or {note}."""
    if ranks[0]["device"] == "cpu":
        return {"note": "CPU run: no GPU links to judge"}
    if len(ranks) < 2:
        return {"note": "one GPU: no links to judge"}
    hosts = sorted({r["place"]["host"] for r in ranks})
    if len(hosts) > 1:
        return {
            "note": f"ranks on {len(hosts)} hosts: the all-reduce crosses the network, whose bandwidth NVML "
            "cannot tell: no bus bandwidth verdict"
        }
    links = [r.get("links") or {} for r in ranks]
    missing = [l for l in links if not l.get("available")]
    if missing:
        return {"note": missing[0].get("note", "NVML unavailable: link check skipped")}
    nvlink = all(l["nvlinks_active"] > 0 for l in links) and all(all(l["nvlink_p2p"].values()) for l in links)
    if nvlink:
        major = min(r["capability"][0] for r in ranks)
        if major not in NVLINK_GB_S:
            return {"note": f"no NVLink figure for compute capability {major}.x: no bus bandwidth verdict"}
        generation, per_link = NVLINK_GB_S[major]
        count = min(l["nvlinks_active"] for l in links)
        nominal = count * per_link
        basis = f"{count} NVLinks x {per_link:g} GB/s each way ({generation})"
    else:
        pcie = [l.get("pcie_max") for l in links]
        if any(p is None or p[0] not in PCIE_GB_S_PER_LANE for p in pcie):
            return {"note": "PCIe generation unknown to NVML: no bus bandwidth verdict"}
        generation, width = min(pcie, key=lambda p: PCIE_GB_S_PER_LANE[p[0]] * p[1])
        nominal = PCIE_GB_S_PER_LANE[generation] * width
        basis = f"PCIe Gen{generation} x{width}, {PCIE_GB_S_PER_LANE[generation]:g} GB/s per lane each way"
    return {
        "link": "NVLink" if nvlink else "PCIe",
        "nominal_gb_s": nominal,
        "expected_busbw_gb_s": LINK_FRACTION * nominal,
        "basis": basis,
    }


# ---------------------------------------------------------------- verdicts and the report


def judge(report: dict) -> List[dict]:
    """The findings: slow devices, GPUs missing NVLinks, an all-reduce far below what the links allow."""
    ranks = report["ranks"]
    findings = []
    for r in ranks:
        peers = [o["matmul"]["tflops"] for o in ranks if o is not r and o["device"] == r["device"]]
        if not peers:
            continue
        median = statistics.median(peers)
        floor = (1 - MATMUL_SHORTFALL) * median
        measured = r["matmul"]["tflops"]
        if measured < floor:
            findings.append(
                _finding(
                    "matmul",
                    r,
                    measured,
                    floor,
                    (
                        f"{distributed.describe(r['place'])}, {r['device']}: matmul {_rate(measured)} TFLOP/s "
                        f"{r['matmul']['precision']}, {100 * (1 - measured / median):.0f}% below the median of its "
                        f"{_count(len(peers), 'peer')} ({_rate(median)}; at least {_rate(floor)} expected)"
                    ),
                )
            )
    links = [r.get("links") or {} for r in ranks]
    if all(l.get("available") for l in links) and ranks[0]["device"] != "cpu":
        for r, l in zip(ranks, links):
            most = max(o["links"]["nvlinks_active"] for o in ranks if o["device"] == r["device"])
            if l["nvlinks_active"] < most:
                findings.append(
                    _finding(
                        "nvlinks",
                        r,
                        l["nvlinks_active"],
                        most,
                        (
                            f"{distributed.describe(r['place'])}, {r['device']}: {l['nvlinks_active']} active NVLinks, "
                            f"where its peers have {most}"
                        ),
                    )
                )
    expected = report.get("link_expectation", {})
    sizes = report["all_reduce"]["sizes"]
    if "expected_busbw_gb_s" in expected and sizes:
        largest = max(sizes, key=lambda s: s["bytes"])
        floor = expected["expected_busbw_gb_s"]
        if largest["busbw_gb_s"] < floor:
            where = ", ".join(f"{r['place']['host']} GPU {r['place']['gpu']}" for r in ranks)
            findings.append(
                {
                    "check": "all_reduce_busbw",
                    "ranks": [r["place"]["rank"] for r in ranks],
                    "measured": largest["busbw_gb_s"],
                    "expected_at_least": floor,
                    "message": (
                        f"all-reduce bus bandwidth {largest['busbw_gb_s']:.1f} GB/s at {_size(largest['bytes'])} over "
                        f"{_count(len(ranks), 'rank')} ({where}) is far below what {expected['link']} allows: at least "
                        f"{floor:.0f} GB/s expected ({100 * LINK_FRACTION:.0f}% of "
                        f"{expected['nominal_gb_s']:.0f} GB/s, "
                        f"{expected['basis']})"
                    ),
                }
            )
    return findings


def _finding(check: str, r: dict, measured: float, expected: float, message: str) -> dict:
    place = r["place"]
    return {
        "check": check,
        "rank": place["rank"],
        "host": place["host"],
        "gpu": place["gpu"],
        "measured": measured,
        "expected_at_least": expected,
        "message": message,
    }


def format_report(report: dict) -> List[str]:
    """The table rank 0 prints, one line per string."""
    ranks = report["ranks"]
    hosts = sorted({r["place"]["host"] for r in ranks})
    lines = [
        f"preflight: {_count(len(ranks), 'rank')} on {_count(len(hosts), 'host')}, {ranks[0]['device']}, "
        f"{report['backend']}, torch {report['torch']}"
    ]
    host_width = max(4, *(len(h) for h in hosts))
    lines.append(f"preflight: {'rank':>4}  {'host':<{host_width}}  {'GPU':>4}  {'matmul TFLOP/s':>19}  {'H2D GB/s':>8}")
    for r in ranks:
        h2d = f"{r['h2d']['gb_s']:.1f}" if r.get("h2d") else "-"
        matmul = f"{_rate(r['matmul']['tflops'])} {r['matmul']['precision']}"
        lines.append(
            f"preflight: {r['place']['rank']:>4}  {r['place']['host']:<{host_width}}  "
            f"{str(r['place']['gpu'] if r['place']['gpu'] is not None else '-'):>4}  {matmul:>19}  {h2d:>8}"
        )
    sweep = report["all_reduce"]
    if sweep["sizes"]:
        lines.append(
            f"preflight: all-reduce, float32 sum in place over {_count(len(ranks), 'rank')}; time: the "
            "slowest rank's mean; algbw = bytes / time, busbw = algbw * 2(n-1)/n (nccl-tests')"
        )
        lines.append(f"preflight: {'size':>9}  {'time us':>10}  {'algbw GB/s':>10}  {'busbw GB/s':>10}")
        for s in sweep["sizes"]:
            lines.append(
                f"preflight: {_size(s['bytes']):>9}  {s['time_us']:>10.1f}  {s['algbw_gb_s']:>10.2f}  "
                f"{s['busbw_gb_s']:>10.2f}"
            )
    if sweep["latency"]:
        lines.append(
            f"preflight: all-reduce latency, {sweep['latency']['bytes']} B: {sweep['latency']['time_us']:.1f} us"
        )
    expected = report.get("link_expectation", {})
    if "expected_busbw_gb_s" in expected:
        lines.append(
            f"preflight: links: {expected['link']}, {expected['basis']}: {expected['nominal_gb_s']:.0f} "
            f"GB/s; busbw at least {expected['expected_busbw_gb_s']:.0f} GB/s expected"
        )
    for r in ranks:
        shm = r.get("shm")
        if shm and "total_bytes" in shm:
            lines.append(
                f"preflight: {shm['path']} on {r['place']['host']}: {shm['total_bytes'] / 2**30:.1f} GiB, "
                f"{shm['free_bytes'] / 2**30:.1f} GiB free"
            )
    disk = report.get("save_dir_write")
    if disk and "mb_s" in disk:
        lines.append(
            f"preflight: save dir {disk['path']}: {_size(disk['bytes'])} written and fsynced at {disk['mb_s']:.0f} MB/s"
        )
    elif disk:
        lines.append(f"preflight: save dir {disk['path']}: write test failed: {disk['error']}")
    lines.extend(f"preflight: note: {note}" for note in report["notes"])
    lines.extend(f"WARNING preflight: {f['message']}" for f in report["findings"])
    return lines


def _shm_notes(config: Config, ranks: List[dict]) -> List[str]:
    notes = []
    for r in ranks:
        shm = r.get("shm") or {}
        fits = shm.get("loader_workers_that_fit")
        if fits is not None and fits < config.training.num_workers:
            notes.append(
                f"{SHM_PATH} on {r['place']['host']} has {shm['free_bytes'] / 2**20:.0f} MiB free: the "
                f"DataLoader will use {fits} of the {config.training.num_workers} workers asked per process "
                "(mount a larger memory-backed /dev/shm for more)"
            )
        elif "error" in shm:
            notes.append(f"{SHM_PATH} on {r['place']['host']}: {shm['error']}")
    return notes


def _all_gather(value, world_size: int) -> list:
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _rate(tflops: float) -> str:
    return f"{tflops:.1f}" if tflops >= 1 else f"{tflops:.3f}"


def _size(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size:g} B"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
