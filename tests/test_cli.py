"""Options, the environment overlay and refusals, as a user meets them."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket

import pytest
from conftest import TINY, run_train

from resnet_ddp.entry.cli import build_parser, parse_config
from resnet_ddp.errors import UsageError


def test_defaults_are_the_original_examples():
    config = parse_config([], environ={})
    training = config.training
    assert (training.epochs, training.batch_size, training.dataset_size, training.lr) == (100, 64, 100_000, 0.001)
    assert (training.num_workers, config.save_dir, training.num_classes) == (4, "./checkpoints", 100)
    assert config.model.arch == "resnet50" and config.model.image_size == 224 and config.model.sync_bn
    assert training.momentum == 0.0 and training.weight_decay == 0.0 and config.process.min_gpus == 2


def test_environment_sets_options_and_command_line_wins():
    env = {
        "RESNET_DDP_BATCH_SIZE": "128",
        "RESNET_DDP_LR": "0.5",
        "RESNET_DDP_CPU": "1",
        "RESNET_DDP_NO_SYNC_BN": "yes",
        "RESNET_DDP_ARCH": "resnet18",
    }
    config = parse_config([], environ=env)
    assert (
        config.training.batch_size,
        config.training.lr,
        config.process.cpu,
        config.model.sync_bn,
        config.model.arch,
    ) == (128, 0.5, True, False, "resnet18")
    assert parse_config(["--batch-size", "32"], environ=env).training.batch_size == 32
    assert parse_config([], environ={"RESNET_DDP_CPU": "0"}).process.cpu is False


def test_output_dir_is_the_save_dir_unless_one_is_named():
    assert parse_config([], environ={"OUTPUT_DIR": "/data/out"}).save_dir == "/data/out"
    assert parse_config(["--save-dir", "mine"], environ={"OUTPUT_DIR": "/data/out"}).save_dir == "mine"
    env = {"OUTPUT_DIR": "/data/out", "RESNET_DDP_SAVE_DIR": "/env/dir"}
    assert parse_config([], environ=env).save_dir == "/env/dir"


@pytest.mark.parametrize(
    "name,value",
    [
        ("RESNET_DDP_EPOCHS", "ten"),
        ("RESNET_DDP_LR", "fast"),
        ("RESNET_DDP_CPU", "maybe"),
        ("RESNET_DDP_ARCH", "vgg16"),
    ],
)
def test_malformed_environment_value_names_the_variable(name, value):
    with pytest.raises(UsageError, match=name):
        parse_config([], environ={name: value})


def test_help_documents_the_environment():
    text = build_parser({}).format_help()
    assert "RESNET_DDP_" in text and "OUTPUT_DIR" in text
    for option in (
        "--epochs",
        "--batch-size",
        "--dataset-size",
        "--lr",
        "--num-workers",
        "--save-dir",
        "--num-classes",
        "--arch",
        "--image-size",
        "--seed",
        "--cpu",
        "--nproc-per-node",
        "--min-gpus",
        "--no-sync-bn",
        "--momentum",
        "--weight-decay",
        "--master-port",
        "--dist-timeout",
    ):
        assert option in text


# A worker's variables as torchrun sets them, but RANK (the cases add theirs).
_TORCHRUN_WORKER = {
    "LOCAL_WORLD_SIZE": "1",
    "WORLD_SIZE": "1",
    "LOCAL_RANK": "0",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29512",
}


@pytest.mark.parametrize(
    "args,env,expected",
    [
        (["--epochs", "0"], {}, "--epochs"),
        (["--batch-size", "-1"], {}, "--batch-size"),
        (["--dataset-size", "0"], {}, "--dataset-size"),
        (["--num-classes", "0"], {}, "--num-classes"),
        (["--image-size", "16"], {}, "--image-size"),
        (["--num-workers", "-1"], {}, "--num-workers"),
        (["--lr", "nan"], {}, "--lr"),
        (["--lr", "-0.1"], {}, "--lr"),
        (["--lr", "inf"], {}, "--lr"),
        (["--arch", "vgg16"], {}, "--arch"),
        (["--epochs", "two"], {}, "--epochs"),
        (["--no-such-option"], {}, "--no-such-option"),
        ([], {"RESNET_DDP_BATCH_SIZE": "big"}, "RESNET_DDP_BATCH_SIZE"),
        ([], {"RESNET_DDP_LR": "nan"}, "--lr must be a positive number a float32 holds, got nan (from RESNET_DDP_LR)"),
        (["--fail-rank", "xyz"], {}, "'xyz' is not a rank (0, 1, ...) or 'all'"),
        (["--scenario", "memory", "--cpu"], {}, "--scenario memory holds GPU memory, and a --cpu run has none"),
        (TINY + ["--dataset-size", "1"], {}, "--dataset-size 1 is smaller than the 2 processes"),
        (TINY + ["--fail-at-step", "1", "--fail-rank", "2"], {}, "--fail-rank 2"),
        (TINY + ["--compile"], {"CXX": "/no/such/compiler"}, "--compile needs a C++ compiler"),
        (TINY + ["--profile-steps", "9:4"], {}, "--profile-steps"),
        (TINY + ["--syncbn-symm-mem"], {}, "--syncbn-symm-mem: symmetric memory is for GPUs"),
        (TINY + ["--num-classes", "1"], {}, "--num-classes must be at least 2"),
        (TINY + ["--fail-rank", "5"], {}, "--fail-rank 5 is not a rank of this 2-process job"),  # no --fail-at-step
        (TINY + ["--image-size", "100000"], {}, "needs at least"),
        (TINY + ["--num-classes", "1000000000"], {}, "needs at least"),
        (TINY + ["--batch-size", "100000", "--image-size", "224"], {}, "needs at least"),
        # values that would overflow or misbehave in torch, c10d or the DataLoader long after the start
        (["--dataset-size", str(2**63)], {}, "--dataset-size must be at most 2**63 - 1"),
        (["--num-workers", "100000"], {}, "--num-workers must be at most"),
        (["--lr", "1e39"], {}, "--lr must be a positive number a float32 holds"),
        (["--weight-decay", "1e308"], {}, "--weight-decay must be"),
        (["--dist-timeout", "1e15"], {}, "--dist-timeout must be between 1 and"),
        (["--dist-timeout", "1e-9"], {}, "--dist-timeout must be between 1 and"),
        (TINY + ["--metrics-port", "29558", "--master-port", "29558"], {}, "give them different ports"),
        (TINY, {"MASTER_PORT": "70000"}, "MASTER_PORT='70000' must be at most 65535"),
        (TINY, {"WORLD_SIZE": "1", "MASTER_ADDR": " ", "MASTER_PORT": "29611"}, "MASTER_ADDR is empty"),
        (["--cpu"], _TORCHRUN_WORKER, "runs as a torchrun worker, but RANK is not"),
        (["--cpu"], {**_TORCHRUN_WORKER, "RANK": "5"}, "RANK=5 must be below WORLD_SIZE=1"),
        (["--cpu"], {**_TORCHRUN_WORKER, "RANK": "0", "GROUP_RANK": "abc"}, "GROUP_RANK='abc' must be an integer"),
        (TINY, {**_TORCHRUN_WORKER, "RANK": "0"}, "--nproc-per-node 2 contradicts torchrun's LOCAL_WORLD_SIZE=1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, env, expected, save_dir):
    result = run_train(*args, "--save-dir", str(save_dir), env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("resnet-ddp: error:") and expected in lines[0]
    assert "Traceback" not in result.stderr and "[Rank" not in result.stdout


def test_nothing_is_created_before_every_refusal_is_done(tmp_path):
    """A refusal leaves no save dir behind: not for a checkpoint that cannot be resumed, nor for a busy port."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, says in (
            ([f"--resume={junk}"], "not a readable checkpoint"),
            (["--master-port", port], f"--master-port {port} cannot be used for the rendezvous"),
            (["--save-dir", ""], "--save-dir is empty"),
        ):
            result = run_train(*TINY, "--save-dir", str(tmp_path / "out"), *args, timeout=60)
            assert result.returncode == 2, result.stderr
            (line,) = result.stderr.strip().splitlines()
            assert says in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["checkpoints.json", "summary.json", "model_final.pth", ".lock"])
def test_a_directory_where_the_job_writes_a_file_is_refused_before_training(name, save_dir):
    (save_dir / name).mkdir(parents=True)
    result = run_train(*TINY, "--save-dir", str(save_dir), timeout=60)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"holds a directory {name}, where the job writes a file" in line
    assert sorted(p.name for p in save_dir.iterdir()) == [name]  # nothing trained, nothing written


def test_a_save_dir_refusal_names_where_the_save_dir_came_from(tmp_path, monkeypatch, capsys):
    from resnet_ddp.entry import cli

    monkeypatch.setenv("OUTPUT_DIR", "   ")  # AstraGo's variable, set blank
    assert cli.main(["--cpu"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "OUTPUT_DIR is blank" in line
    monkeypatch.delenv("OUTPUT_DIR")
    dangling = tmp_path / "volume"
    dangling.symlink_to(tmp_path / "not-mounted")
    assert cli.main(["--cpu", "--save-dir", str(dangling)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is a symbolic link to" in line and "which does not exist" in line
    assert not (tmp_path / "not-mounted").exists()


def test_help_shows_a_scenarios_defaults_and_comes_despite_a_malformed_variable(monkeypatch, capsys):
    from resnet_ddp.entry import cli

    with pytest.raises(SystemExit) as exit:
        cli.main(["--scenario", "burst", "--help"])
    assert exit.value.code == 0 and "(from --scenario burst)" in " ".join(capsys.readouterr().out.split())
    monkeypatch.setenv("RESNET_DDP_EPOCHS", "x")
    with pytest.raises(SystemExit) as exit:
        cli.main(["--help"])
    captured = capsys.readouterr()
    assert exit.value.code == 0 and "usage: resnet-ddp" in captured.out
    (warning,) = captured.err.strip().splitlines()
    assert "RESNET_DDP_EPOCHS='x' is not valid for --epochs" in warning


def test_every_spelling_of_zero_ends_the_metrics_linger_at_once():
    from resnet_ddp.entry.values import parse_duration_or_zero

    assert [parse_duration_or_zero(text) for text in ("0", "0s", "0.0", "00", "0m")] == [0.0] * 5
    assert parse_duration_or_zero("1m30s") == 90.0


def test_the_launchers_lines_follow_the_log_format(monkeypatch, capsys):
    from resnet_ddp.entry import cli

    for spelling in (["--log-format", "json"], ["--log-form=json"]):  # argparse takes abbreviations too
        assert cli.main(["--epochs", "0", *spelling]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        record = json.loads(line)
        assert (record["level"], record["rank"], record["message"]) == (
            "ERROR",
            None,
            "error: --epochs must be at least 1, got 0",
        )
    monkeypatch.setenv("RESNET_DDP_LOG_TIMESTAMPS", "1")
    assert cli.main(["--epochs", "0"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z resnet-ddp: error: --epochs must be at least 1, got 0", line
    )


def test_a_variable_that_names_no_option_is_named_in_a_warning(monkeypatch, capsys):
    from resnet_ddp.entry import cli

    monkeypatch.setenv("RESNET_DDP_BATCH_SIZ", "128")
    assert cli.main(["--epochs", "0"]) == 2  # refused after the warning, before any process starts
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning == (
        "resnet-ddp: warning: RESNET_DDP_BATCH_SIZ is not an option's variable and is ignored "
        "(did you mean RESNET_DDP_BATCH_SIZE?)"
    )
    assert "--epochs must be at least 1" in error


def test_help_names_each_variable_and_the_default_the_environment_gives(capsys):
    from resnet_ddp import __version__
    from resnet_ddp.entry import cli

    text = build_parser({"RESNET_DDP_BATCH_SIZE": "128", "RESNET_DDP_EPOCHS": "7"}).format_help()
    flat = " ".join(text.split())
    assert "batch size per process (default: 128 (from RESNET_DDP_BATCH_SIZE); env RESNET_DDP_BATCH_SIZE)" in flat
    assert "epochs to train (default: 7 (from RESNET_DDP_EPOCHS); env RESNET_DDP_EPOCHS)" in flat
    assert "(default: None)" not in flat and "(default: False)" not in flat
    assert "resnet-ddp report SAVE_DIR" in text.splitlines()[1]  # the usage names the subcommand
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"resnet-ddp {__version__}"


def test_unwritable_save_dir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_train(*TINY, "--save-dir", str(blocker / "out"), timeout=60)
    assert result.returncode == 2
    assert "save dir" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "[Rank" not in result.stdout


def test_durations_read_as_people_write_them():
    assert [
        parse_config(["--duration", d], environ={}).length.duration_s
        for d in ("90s", "10m", "2h", "45", "1h30m", "1m30s")
    ] == [90, 600, 7200, 45, 5400, 90]
    assert parse_config([], environ={"RESNET_DDP_DURATION": "1.5m"}).length.duration_s == 90
    for bad in ("0", "-5m", "ten minutes", "5x", "1h30", "m"):
        with pytest.raises(UsageError, match="--duration"):
            parse_config(["--duration", bad], environ={})
    with pytest.raises(UsageError, match="RESNET_DDP_DURATION"):
        parse_config([], environ={"RESNET_DDP_DURATION": "soon"})


def _plan(world_size, nproc, device_type="cuda"):
    from resnet_ddp.entry.launch import LaunchPlan

    return LaunchPlan("standalone", device_type, nproc, 0, world_size, "127.0.0.1", 29500)


# NVML as nvidia-ml-py shows it, for two H200s (a CPU machine has no driver for the real one).
FAKE_NVML = """
class NVMLError(Exception):
    pass


NVML_COMPUTEMODE_DEFAULT, NVML_COMPUTEMODE_EXCLUSIVE_PROCESS = 0, 3
# UUID, name, compute capability, memory, MIG mode, compute mode
GPUS = [
    ["GPU-a1b2c3d4-0000", "NVIDIA H200", (9, 0), 150_000_000_000, 0, 0],
    ["GPU-e5f6a7b8-1111", "NVIDIA H200", (9, 0), 150_000_000_000, 0, 0],
]


class _Memory:
    def __init__(self, total):
        self.total = total


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return len(GPUS)


def nvmlDeviceGetHandleByIndex(index):
    return index


def nvmlDeviceGetUUID(handle):
    return GPUS[handle][0]


def nvmlDeviceGetName(handle):
    return GPUS[handle][1]


def nvmlDeviceGetCudaComputeCapability(handle):
    return GPUS[handle][2]


def nvmlDeviceGetMemoryInfo(handle):
    return _Memory(GPUS[handle][3])


def nvmlDeviceGetMigMode(handle):
    return GPUS[handle][4], GPUS[handle][4]


def nvmlDeviceGetComputeMode(handle):
    return GPUS[handle][5]
"""


@pytest.fixture
def fake_nvml(monkeypatch):
    import sys
    import types

    module = types.ModuleType("pynvml")
    exec(FAKE_NVML, module.__dict__)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


def test_cuda_visible_devices_picks_nvml_gpus_as_cuda_does_and_what_is_uncertain_is_left_to_torch():
    from resnet_ddp.entry.gpus import select

    uuids = ["GPU-a1b2-0", "GPU-c3d4-1", "GPU-e5f6-2"]
    same, mixed = ["NVIDIA H200"] * 3, ["NVIDIA H200", "NVIDIA H100", "NVIDIA H200"]
    assert select(None, uuids, same, pci_order=False) == [0, 1, 2]
    assert select("2,0", uuids, same, pci_order=False) == [2, 0]
    assert select(" GPU-c3d4 ,GPU-a1", uuids, same, pci_order=False) == [1, 0]  # unique prefixes
    # CUDA stops at the first index that names no GPU: "-1" and "" hide them all.
    assert select("1,7,0", uuids, same, pci_order=False) == [1]
    assert select("-1", uuids, same, pci_order=False) == []
    assert select("", uuids, same, pci_order=False) == []
    # Indices of GPUs of several models follow CUDA's fastest-first order, unless told PCI order.
    assert select("0", uuids, mixed, pci_order=False) is None
    assert select("0", uuids, mixed, pci_order=True) == [0]
    for uncertain in ("MIG-9f8e7d6c", "GPU-", "GPU-ffff", "0,0"):
        assert select(uncertain, uuids, same, pci_order=False) is None, uncertain


def test_the_launcher_counts_and_checks_gpus_through_nvml(fake_nvml, monkeypatch):
    from resnet_ddp.entry import launch, refusals

    def plan(args, environ):
        return launch.plan_launch(parse_config(args, environ={}), environ)

    both = plan([], {})
    assert both.nproc == 2 and [gpu.name for gpu in both.gpus] == ["NVIDIA H200"] * 2
    # Whether a helper process may open the GPU beside the rank (kernel_prebuild.py): the compute mode says.
    assert [gpu.shared for gpu in both.gpus] == [True, True]
    fake_nvml.GPUS[0][5] = fake_nvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
    assert [gpu.shared for gpu in plan([], {}).gpus] == [False, True]
    assert plan(["--min-gpus", "1"], {"CUDA_VISIBLE_DEVICES": "GPU-e5f6"}).nproc == 1
    with pytest.raises(UsageError, match="found 1 GPU"):
        plan([], {"CUDA_VISIBLE_DEVICES": "1"})
    fake_nvml.GPUS[1][1:3] = "Tesla V100-SXM2-32GB", (7, 0)
    with pytest.raises(UsageError, match="--amp bf16 needs an Ampere or newer GPU; Tesla V100-SXM2-32GB lacks"):
        plan(["--amp", "bf16"], {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert plan(["--amp", "bf16", "--min-gpus", "1", "--nproc-per-node", "1"], {}).nproc == 1  # only GPU 0 used
    fake_nvml.GPUS[0][3] = 2**27
    with pytest.raises(UsageError, match=r"more than the 0\.1 GiB of NVIDIA H200"):
        refusals.check_memory_fits(parse_config([], environ={}), plan(["--min-gpus", "1"], {}))
    # What NVML cannot answer for certain, torch answers: MIG, or an nvidia-ml-py without one of the calls.
    from resnet_ddp.entry import gpus

    monkeypatch.setattr(gpus, "_from_torch", lambda: ["torch's answer"])
    fake_nvml.GPUS[1][4] = 1
    assert gpus.visible_gpus({}) == ["torch's answer"]
    fake_nvml.GPUS[1][4] = 0
    assert len(gpus.visible_gpus({})) == 2
    del fake_nvml.nvmlDeviceGetComputeMode  # not known, and not worth torch's import
    assert [gpu.shared for gpu in gpus.visible_gpus({})] == [None, None]
    del fake_nvml.nvmlDeviceGetCudaComputeCapability
    assert gpus.visible_gpus({}) == ["torch's answer"]


def _plan_in_a_new_process(tmp_path, args_lists, save_dir=None):
    """Plan, settle and check each job as the launcher does, in a fresh interpreter with two fake H200s (the
    second visible); its output, and whether torch was imported."""
    import subprocess
    import sys

    (tmp_path / "pynvml.py").write_text(FAKE_NVML)
    script = (
        "import os, sys\n"
        "from resnet_ddp.entry import cli, launch, refusals, resolve\n"
        "from resnet_ddp.errors import UsageError\n"
        f"for args in {args_lists!r}:\n"
        "    config = cli.parse_config(args + ['--min-gpus', '1'], environ={})\n"
        "    plan = launch.plan_launch(config, os.environ)\n"
        "    config = resolve.settle(config, plan, announce=False)\n"
        "    try:\n"
        "        refusals.refuse_what_cannot_run(config, plan)\n"
        "        print(plan.nproc)\n"
        "    except UsageError as exc:\n"
        "        print(exc)\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]), CUDA_VISIBLE_DEVICES="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_one_gpu_job_is_planned_without_importing_torch(tmp_path):
    """The launcher starts its ranks without torch's seconds of import: the ranks import it anyway. (On several
    GPUs it still asks torch whether SyncBatchNorm can use symmetric memory between them.)"""
    save = str(tmp_path / "save")
    jobs = [["--save-dir", save], ["--fast", "--save-dir", save], ["--amp", "bf16", "--save-dir", save + "2"]]
    assert _plan_in_a_new_process(tmp_path, jobs) == ["1", "1", "1", "no torch"]


def test_a_restarted_job_is_checked_against_its_lineages_record_without_loading_a_checkpoint(tmp_path):
    """checkpoints.json records the arithmetic options of its checkpoints: a restart's launcher refuses other
    ones from it, and leaves the loading (and torch's import) to the training process."""
    save = tmp_path / "save"
    save.mkdir()
    (save / "checkpoint-000000040.pt").write_bytes(b"the training process loads it")
    fingerprint = {"arch": "resnet50", "num_classes": 100, "image_size": 224, "amp": "off"}
    (save / "checkpoints.json").write_text(
        json.dumps({"newest_first": ["checkpoint-000000040.pt"], "fingerprint": fingerprint})
    )
    lines = _plan_in_a_new_process(tmp_path, [["--save-dir", str(save)], ["--save-dir", str(save), "--amp", "bf16"]])
    assert lines[0] == "1" and lines[-1] == "no torch"
    assert lines[1].startswith(f"checkpoint {save / 'checkpoint-000000040.pt'} was made with other arithmetic: ")
    assert "amp 'off' (now 'bf16')" in lines[1]


@pytest.fixture
def launcher_lines():
    """The launcher's console, as cli.main sets it up before settling: its `resnet-ddp: ...` lines reach stdout."""
    from resnet_ddp.observe import console

    console.setup_launcher()


def test_fast_compiles_on_gpus_that_can_build_and_says_so_where_they_cannot(monkeypatch, capsys, launcher_lines):
    from resnet_ddp.entry import resolve

    def compiled(args, environ=None, device_type="cuda"):
        config = parse_config(args + ["--no-syncbn-symm-mem"], environ=environ or {})
        return resolve.settle(config, _plan(1, 1, device_type), announce=True).speed.compile

    monkeypatch.setattr(resolve, "compiler_missing", lambda device_type: None)
    monkeypatch.setattr(resolve, "torch_version", lambda: "2.11.0+cu130")  # whatever runs the suite
    assert compiled(["--fast"]) is True
    assert compiled(["--fast"], device_type="cpu") is False  # minutes of start-up for little
    # A slim image: --fast still runs, uncompiled, and the launcher says why in one line.
    monkeypatch.setattr(resolve, "compiler_missing", lambda device_type: "needs Triton, and it is not installed here")
    assert compiled(["--fast"]) is False
    assert capsys.readouterr().out == (
        "resnet-ddp: --fast runs without --compile here: torch.compile needs Triton, and it is not installed here\n"
    )
    # What the user says wins over --fast; an explicit --compile is then refused where it cannot build.
    with pytest.raises(UsageError, match="--compile needs Triton"):
        compiled(["--fast", "--compile"])
    assert compiled(["--fast", "--no-compile"]) is False
    assert compiled(["--fast"], environ={"RESNET_DDP_COMPILE": "0"}) is False
    assert parse_config([], environ={}).speed.compile is False
    # An old torch (the AstraGo images' 2.2) would compile SyncBatchNorm only in pieces: --fast leaves it out.
    monkeypatch.setattr(resolve, "compiler_missing", lambda device_type: None)
    monkeypatch.setattr(resolve, "torch_version", lambda: "2.2.2+cu121")
    assert compiled(["--fast"]) is False
    assert "torch 2.2.2+cu121 splits the compiled graph at every SyncBatchNorm layer" in capsys.readouterr().out
    assert compiled(["--fast", "--no-sync-bn"]) is True
    assert compiled(["--fast", "--compile"]) is True


def test_what_depends_on_the_machine_is_settled_to_plain_values_before_any_process_starts():
    from resnet_ddp.entry import resolve

    gpu = resolve.settle(parse_config(["--no-syncbn-symm-mem"], environ={}), _plan(1, 1), announce=False).speed
    assert (gpu.channels_last, gpu.cuda_graphs, gpu.compile, gpu.syncbn_symm_mem) == (True, True, False, False)
    cpu = resolve.settle(parse_config(TINY, environ={}), _plan(2, 2, "cpu"), announce=False).speed
    assert (cpu.channels_last, cpu.cuda_graphs, cpu.compile, cpu.syncbn_symm_mem) == (False, False, False, False)
    fp16 = resolve.settle(
        parse_config(["--amp", "fp16", "--cuda-graphs", "--no-syncbn-symm-mem"], environ={}),
        _plan(1, 1),
        announce=False,
    ).speed
    assert fp16.cuda_graphs is False  # the scaler reads the host: no capture, even when asked


def test_cudnn_benchmark_is_off_unless_asked_for_even_with_fast():
    # Its first step compiles cuDNN's candidate kernels on a new machine: a start-up cost users opt into.
    assert parse_config([], environ={}).speed.cudnn_benchmark is False
    assert parse_config(["--fast"], environ={}).speed.cudnn_benchmark is False
    assert parse_config(["--cudnn-benchmark"], environ={}).speed.cudnn_benchmark is True
    assert parse_config([], environ={"RESNET_DDP_CUDNN_BENCHMARK": "1"}).speed.cudnn_benchmark is True


def test_symmetric_memory_syncbn_is_refused_where_it_cannot_run_and_taken_where_it_can(
    monkeypatch, capsys, launcher_lines
):
    import torch

    from resnet_ddp.entry import resolve
    from resnet_ddp.layers import syncbn, syncbn_symm

    peers = {(0, 1), (1, 0), (0, 2), (2, 0)}  # GPUs 1 and 2 cannot reach each other
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: (a, b) in peers)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(syncbn, "symmetric_memory_missing", lambda: None)
    monkeypatch.setattr(syncbn_symm, "missing", lambda: None)

    def symm(config, plan):
        return resolve._settle_symm_mem(config, plan, announce=True)

    default = parse_config([], environ={})
    fast = dataclasses.replace(default, speed=dataclasses.replace(default.speed, compile=True, amp="bf16"))
    assert fast.speed.syncbn_symm_mem is None and default.speed.syncbn_symm_mem is None
    assert parse_config(["--no-syncbn-symm-mem"], environ={}).speed.syncbn_symm_mem is False
    # Compiled or not, it is taken where it can run, without a word.
    assert symm(fast, _plan(2, 2)) is True and symm(default, _plan(2, 2)) is True
    assert capsys.readouterr().out == ""
    # Otherwise it stays on NCCL and says why once; an explicit request is refused with the same reason.
    assert symm(default, _plan(3, 3)) is False
    assert capsys.readouterr().out == (
        "resnet-ddp: SyncBatchNorm's collectives stay on NCCL: GPU 1 has no peer access to GPU 2\n"
    )

    def asked(config, **model):
        return dataclasses.replace(
            config,
            speed=dataclasses.replace(config.speed, syncbn_symm_mem=True),
            model=dataclasses.replace(config.model, **model),
        )

    explicit = asked(fast)
    reasons = {
        "has no peer access": (explicit, _plan(3, 3)),
        "this launcher starts 2 of the job's 4 processes": (explicit, _plan(4, 2)),
        "sees 3 of the node's 4 GPUs": (explicit, _plan(4, 4)),
        "has no peers": (explicit, _plan(1, 1)),
        "SyncBatchNorm is off": (asked(fast, sync_bn=False), _plan(2, 2)),
        "for GPUs": (explicit, _plan(2, 2, "cpu")),
    }
    for reason, (config, launch_plan) in reasons.items():
        with pytest.raises(UsageError, match=f"--syncbn-symm-mem: .*{re.escape(reason)}"):
            symm(config, launch_plan)
    # What torch lacks is asked of the path that runs: inductor's lowering when compiled, the eager kernels if not.
    monkeypatch.setattr(
        syncbn, "symmetric_memory_missing", lambda: "torch 2.4 lacks torch._inductor.config._collective"
    )
    with pytest.raises(UsageError, match="lacks torch._inductor"):
        symm(explicit, _plan(2, 2))
    uncompiled = dataclasses.replace(explicit, speed=dataclasses.replace(explicit.speed, compile=False))
    assert symm(uncompiled, _plan(2, 2)) is True
    monkeypatch.setattr(syncbn_symm, "missing", lambda: "torch 2.2.2 lacks torch.ops.symm_mem.one_shot_all_reduce")
    with pytest.raises(UsageError, match="lacks torch.ops.symm_mem"):
        symm(uncompiled, _plan(2, 2))
    # Quiet where there is nothing to choose: a job of one process, or on CPUs.
    assert symm(fast, _plan(1, 1)) is False and symm(default, _plan(2, 2, "cpu")) is False
    assert capsys.readouterr().out == ""
