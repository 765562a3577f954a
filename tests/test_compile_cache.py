"""torch.compile's caches in the save dir: keyed by what shapes them, never trusted where the key does not match."""

from __future__ import annotations

import json
import os
import sys

import torch

from resnet_ddp.core import compile_cache

FIELDS = {
    "torch": "2.11.0+cu130",
    "triton": "3.6.0",
    "cuda": "13.0",
    "python": "3.12.3",
    "device": "cuda",
    "gpu": "NVIDIA H200",
    "capability": [9, 0],
    "arch": "resnet50",
    "num_classes": 100,
    "image_size": 224,
    "amp": "bf16",
    "batch_size": 256,
    "world_size": 1,
}


def test_another_torch_gpu_or_configuration_gets_another_cache(tmp_path):
    mine = compile_cache.prepare(str(tmp_path), FIELDS)
    assert mine == compile_cache.prepare(str(tmp_path), dict(FIELDS))  # the same job finds its own again
    assert json.loads((tmp_path / "compile-cache" / os.path.basename(mine) / "key.json").read_text()) == FIELDS
    others = {
        compile_cache.prepare(str(tmp_path), {**FIELDS, name: value})
        for name, value in (
            ("torch", "2.12.0"),
            ("gpu", "NVIDIA H100 80GB HBM3"),
            ("capability", [8, 0]),
            ("amp", "off"),
            ("batch_size", 128),
            ("world_size", 2),
            ("triton", "3.7.0"),
        )
    }
    assert mine not in others and len(others) == 7
    assert sorted(os.listdir(tmp_path / "compile-cache")) == sorted(map(os.path.basename, others | {mine}))


def test_a_cache_whose_key_file_does_not_match_its_name_is_emptied_before_use(tmp_path):
    path = compile_cache.prepare(str(tmp_path), FIELDS)
    artifact = os.path.join(path, "inductor", "fxgraph", "a-compiled-graph")
    os.makedirs(os.path.dirname(artifact))
    with open(artifact, "w") as f:
        f.write("compiled for another torch")
    with open(os.path.join(path, "key.json"), "w") as f:
        json.dump({**FIELDS, "torch": "2.9.0"}, f)  # a directory copied under the wrong name
    assert compile_cache.prepare(str(tmp_path), FIELDS) == path
    assert not os.path.exists(artifact)  # refused, not loaded
    assert json.loads(open(os.path.join(path, "key.json")).read()) == FIELDS
    kept = os.path.join(path, "inductor", "kept")
    os.makedirs(kept)
    compile_cache.prepare(str(tmp_path), FIELDS)
    assert os.path.isdir(kept)  # a matching cache is left as it is


def test_the_caches_point_into_the_save_dir_and_the_key_names_this_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    path = compile_cache.prepare(str(tmp_path), FIELDS)
    compile_cache.use(path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(path, "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == os.path.join(path, "triton")
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == os.path.join(path, "inductor")  # what inductor itself will use
    here = compile_cache.environment_fields(torch.device("cpu"))
    assert here["torch"] == torch.__version__ and here["device"] == "cpu" and "gpu" not in here


def test_the_kernel_caches_follow_the_save_dir_unless_the_user_chose_a_place(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_CACHE_PATH", raising=False)
    monkeypatch.setenv("PYTORCH_KERNEL_CACHE_PATH", "/my/kernels")
    compile_cache.keep_machine_caches_in(str(tmp_path / "save"))
    assert os.environ["CUDA_CACHE_PATH"] == str(tmp_path / "save" / "compile-cache" / "cuda")
    assert os.environ["PYTORCH_KERNEL_CACHE_PATH"] == "/my/kernels"  # the user's choice stands
    assert not (tmp_path / "save").exists()  # nothing made before the job's refusals are done


def _start_in_a_new_process(tmp_path, env, args=(), save="save"):
    """A launcher's start over a torch whose sources are in tmp_path/site: whether the job keeps bytecode, then
    the import of torch, and what a process it starts (a rank) is told."""
    import subprocess

    script = (
        "import os, subprocess, sys\n"
        "from resnet_ddp.entry import cli, launch\n"
        "launch.run = lambda config, plan: 0  # the launcher up to its ranks' start\n"
        "cli.main(['--cpu', '--save-dir', sys.argv[1]] + sys.argv[2:])\n"
        "kept = sys.pycache_prefix == os.path.join(sys.argv[1], 'compile-cache', 'python')\n"
        "import torch\n"
        "child = 'import sys; print(sys.pycache_prefix, sys.flags.dont_write_bytecode)'\n"
        "rank = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout.strip()\n"
        "print(kept, '|', rank)\n"
    )
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.getcwd()]), **env)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / save), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_torch_installed_without_bytecode_has_the_jobs_processes_keep_it_in_the_save_dir(tmp_path):
    """An image built without bytecode (and PYTHONDONTWRITEBYTECODE set) would have every process of every start
    compile torch's Python source again; the save dir, which a restarted pod keeps, holds it instead."""
    import compileall

    (tmp_path / "site" / "torch").mkdir(parents=True)
    (tmp_path / "site" / "torch" / "__init__.py").write_text("VERSION = 'fake'\n")
    prefix = tmp_path / "save" / "compile-cache" / "python"
    no_writing = {"PYTHONDONTWRITEBYTECODE": "1"}
    assert _start_in_a_new_process(tmp_path, no_writing) == f"True | {prefix} 0"
    assert [p.name for p in prefix.rglob("*.pyc") if "torch" in p.parts] == [
        f"__init__.{sys.implementation.cache_tag}.pyc"
    ]
    assert not (tmp_path / "site" / "torch" / "__pycache__").exists()  # nothing written beside the sources
    # A preflight check alone leaves its report and logs in the save dir, nothing more.
    check = _start_in_a_new_process(tmp_path, no_writing, ["--preflight-only"], save="check")
    assert check == "False | None 1" and not (tmp_path / "check" / "compile-cache").exists()
    # A prefix the user chose is theirs.
    assert _start_in_a_new_process(tmp_path, {**no_writing, "PYTHONPYCACHEPREFIX": str(tmp_path / "mine")}) == (
        f"False | {tmp_path / 'mine'} 1"
    )
    # An image with the bytecode: a prefix would hide it.
    compileall.compile_dir(str(tmp_path / "site"), quiet=1)
    assert _start_in_a_new_process(tmp_path, no_writing) == "False | None 1"
