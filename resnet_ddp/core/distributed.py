"""Process group set-up and teardown, the facts about this rank, collective helpers."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    node: int = 0  # this node's index among the job's nodes (torchrun's GROUP_RANK)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(device_type: str, timeout_s: float) -> RankInfo:
    """Join the job's process group from the env:// variables (ours or torchrun's)."""
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    node = int(os.environ.get("GROUP_RANK", rank // local_world_size))
    info = RankInfo(rank, world_size, local_rank, local_world_size, device, node)
    _register_process(info)
    return info


def share_host_cores(rank: RankInfo) -> None:
    """CPU ranks: share this host's cores between its ranks instead of oversubscribing them."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // rank.local_world_size))


def destroy_process_group() -> None:
    if dist.is_initialized():
        # In older torch (fixed upstream in June 2025, pytorch#154976) a gloo group's destructor holds the GIL
        # while it joins the group's worker threads, and a worker still freeing a finished collective's tensors
        # needs the GIL too: a CPU job hung there in 5 of 15 runs on torch 2.2.2, and none of 20 with this
        # pause. GPU jobs have gloo groups too (the stop agreement, the straggler check). Sleeping releases the
        # GIL, so the workers finish first.
        time.sleep(0.05)
        dist.destroy_process_group()


def gather_rows(row: torch.Tensor) -> List[List[float]]:
    """Every rank's copy of a small 1-D tensor, in rank order, on the host: one collective, one wait for the device."""
    parts = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, row)
    return torch.stack(parts).tolist()


def physical_gpu(device: torch.device) -> Optional[str]:
    """The GPU as the machine numbers it: its CUDA_VISIBLE_DEVICES entry (an index or UUID), else its index."""
    if device.type != "cuda":
        return None
    entries = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return entries[device.index] if device.index < len(entries) else str(device.index)


def placement(rank: RankInfo) -> Dict[str, object]:
    """Where this rank runs, to name it in a report: rank, host, local rank and GPU."""
    return {
        "rank": rank.rank,
        "host": socket.gethostname(),
        "local_rank": rank.local_rank,
        "gpu": physical_gpu(rank.device),
    }


def describe(place: Dict[str, object]) -> str:
    """'rank 1 (host node-a, GPU 1)' from placement()."""
    where = f"host {place['host']}" + (f", GPU {place['gpu']}" if place.get("gpu") is not None else "")
    return f"rank {place['rank']} ({where})"


_ATTEMPT = "resnet_ddp/attempt{attempt}"  # torchrun restarts a job's workers with a new attempt number
FAILURE_STORE_TIMEOUT_S = 5.0
_PF_EXITING = 0x4  # /proc/<pid>/stat's flags: the process is ending


def _prefix() -> str:
    return _ATTEMPT.format(attempt=os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _process_space() -> str:
    """This host and PID namespace: where a peer's pid means the same process (pods may share a host name)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{namespace}"


def _register_process(rank: RankInfo) -> None:
    """Put this rank's pid in the store, where a peer of this host that fails can see whether it is still alive."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(
            f"{_prefix()}/pids/{_process_space()}/{rank.local_rank}",
            json.dumps({"rank": rank.rank, "pid": os.getpid()}),
        )
    except Exception:  # a store without set: a peer's death goes unnamed, nothing worse
        pass


def _process_ended(pid: int) -> bool:
    """Gone, a zombie, or ending (its sockets close before it becomes a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)


def _ended_peer(store, place: Dict[str, object], local_world_size: int) -> Optional[Dict[str, object]]:
    """A rank of this host whose process has ended: it failed without a word (a kill, the OOM killer, an exit)."""
    pids = f"{_prefix()}/pids/{_process_space()}"
    for local_rank in range(local_world_size):
        key = f"{pids}/{local_rank}"
        if local_rank == place["local_rank"] or not store.check([key]):
            continue
        peer = json.loads(store.get(key))
        if _process_ended(peer["pid"]):
            return {"rank": peer["rank"], "host": place["host"], "error": None, "ended": True, "time": time.time()}
    return None


def record_failure(place: Dict[str, object], error: str, local_world_size: int = 1) -> Optional[Dict[str, object]]:
    """Tell the job that this rank failed; returns the job's first failure (this one, or a peer's that came first).

    Through the process group's key-value store, which every rank reaches: the
    first rank to count itself there is the root cause, and the others, failing
    because of it, learn who it was. A rank of this host whose process has already
    ended, with nothing counted, came first: it is counted first (error None,
    "ended" True). None where the store cannot be reached (it lives in a process
    that is gone), within a few seconds.
    """
    failures = f"{_prefix()}/failures"
    mine = {**place, "error": error, "time": time.time()}
    try:
        store = _listening_store()
        if store is None:
            return None
        records = [mine]
        if not store.check([f"{failures}/1"]):
            ended = _ended_peer(store, place, local_world_size)
            records = [ended, mine] if ended else records
        numbers = []
        for record in records:
            numbers.append(store.add(f"{failures}/count", 1))
            store.set(f"{failures}/{numbers[-1]}", json.dumps(record))
        if numbers[0] == 1:
            return records[0]
        store.wait([f"{failures}/1"], timedelta(seconds=FAILURE_STORE_TIMEOUT_S))
        return json.loads(store.get(f"{failures}/1"))
    except Exception:  # no group, no store, a store whose host has gone: say what this rank knows
        return None


def count_a_stop_at_once() -> None:
    """This rank ends on a stop signal before its first step: peers past theirs, which then find it gone, learn
    from the store that the job was stopped, not broken."""
    try:
        store = _listening_store()
        if store is not None:
            store.add(f"{_prefix()}/stopped_at_once", 1)
    except Exception:  # not joined yet, or no store: nobody has stepped to ask
        pass


def broken_by_a_stop() -> bool:
    """After this rank received a stop signal and then broke: whether a peer ended on that signal before its first
    step (and no rank counted a failure first). Not where the store has gone with rank 0's process: then nobody
    can tell (the launcher can: entry/launch.py)."""
    try:
        store = _listening_store()
        if store is None or store.check([f"{_prefix()}/failures/1"]):
            return False
        return store.add(f"{_prefix()}/stopped_at_once", 0) > 0
    except Exception:  # the store went while asked
        return False


def _listening_store():
    """The job's key-value store, with a short timeout; None where its address no longer takes connections."""
    if not _store_listening():
        return None
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=FAILURE_STORE_TIMEOUT_S))
    return store


def _store_listening() -> bool:
    """Whether the env:// store's address still takes connections. Where its host has gone (rank 0 died first),
    asking the store would fail all the same, after torch prints a C++ stack trace of its own on stderr."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return True  # not env://: the store call finds out
    try:
        socket.create_connection((addr, int(port)), timeout=FAILURE_STORE_TIMEOUT_S).close()
        return True
    except (OSError, ValueError):
        return False
