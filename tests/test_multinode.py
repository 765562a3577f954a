"""Two nodes on one machine: two torchrun agents over a c10d rendezvous, and two node-level launchers."""

from __future__ import annotations

import sys

from conftest import TINY, Job, free_port, train_command, wait_for_no_leftovers
from test_training import EPOCH_LINE


def _agent(port: int, save_dir, *extra: str) -> Job:
    return Job(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            "two-nodes",
            "train.py",
            *TINY,
            "--nproc-per-node",
            "1",
            "--save-dir",
            str(save_dir),
            *extra,
        ]
    )


def test_two_torchrun_agents_make_one_job(tmp_path):
    port = free_port()
    agents = [_agent(port, tmp_path / f"node{i}") for i in range(2)]
    results = [agent.wait(timeout=240) for agent in agents]
    assert all(r.returncode == 0 for r in results), [r.stderr[-1500:] for r in results]
    ranks = [{rank for rank, _, _ in EPOCH_LINE.findall(r.stdout)} for r in results]
    assert sorted(ranks, key=sorted) == [{"0"}, {"1"}]  # one rank on each node, numbered across them
    main = 0 if ranks[0] == {"0"} else 1
    assert "(2 ranks)" in results[main].stdout
    assert (tmp_path / f"node{main}" / "model_final.pth").exists()
    assert not (tmp_path / f"node{1 - main}" / "model_final.pth").exists()  # only global rank 0 saves
    # each node its own metrics file: a save dir shared by nodes never has two hosts append to one file
    assert sorted(p.name for p in (tmp_path / f"node{main}" / "logs").glob("metrics*")) == ["metrics.jsonl"]
    assert sorted(p.name for p in (tmp_path / f"node{1 - main}" / "logs").glob("metrics*")) == ["metrics-node1.jsonl"]


def test_a_failure_on_one_node_ends_both(tmp_path):
    port = free_port()
    agents = [
        _agent(port, tmp_path / f"node{i}", "--epochs", "50", "--fail-at-step", "3", "--fail-rank", "1")
        for i in range(2)
    ]
    results = [agent.wait(timeout=240) for agent in agents]
    assert all(r.returncode != 0 for r in results)
    assert any("InjectedFault" in r.stderr for r in results)
    assert all(wait_for_no_leftovers(agent) == [] for agent in agents)


def test_a_failure_on_one_node_ends_both_node_level_launchers(tmp_path):
    port = str(free_port())
    nodes = [
        Job(
            train_command(
                *TINY,
                "--nproc-per-node",
                "1",
                "--epochs",
                "50",
                "--fail-at-step",
                "3",
                "--fail-rank",
                "1",
                "--save-dir",
                str(tmp_path / f"node{node}"),
            ),
            {"RANK": str(node), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
        )
        for node in range(2)
    ]
    results = [node.wait(timeout=240) for node in nodes]
    assert results[1].returncode == 1 and "rank 1 exited with code 1" in results[1].stderr, results[1].stderr[-3000:]
    assert results[0].returncode != 0, results[0].stderr[-3000:]
    assert all(wait_for_no_leftovers(node) == [] for node in nodes)
