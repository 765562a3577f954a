"""The container image and the Kubernetes manifests keep the properties a platform relies on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from resnet_ddp.cli import parse_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


def _documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pod_specs(doc):
    """Every pod spec in a Job, PyTorchJob or ClusterTrainingRuntime."""
    kind = doc["kind"]
    if kind == "Job":
        return [doc["spec"]["template"]["spec"]]
    if kind == "PyTorchJob":
        return [r["template"]["spec"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if kind == "ClusterTrainingRuntime":
        return [j["template"]["spec"]["template"]["spec"] for j in doc["spec"]["template"]["spec"]["replicatedJobs"]]
    return []


def _workloads():
    return [(path.name, doc) for path in MANIFESTS for doc in _documents(path) if _pod_specs(doc)]


def test_the_three_launch_paths_have_a_manifest():
    kinds = {(doc["apiVersion"], doc["kind"]) for path in MANIFESTS for doc in _documents(path)}
    assert {("batch/v1", "Job"), ("kubeflow.org/v1", "PyTorchJob"),
            ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
            ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime")} <= kinds


@pytest.mark.parametrize("name,doc", _workloads(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_pod_has_shm_a_save_volume_a_grace_period_and_a_non_root_user(name, doc):
    for pod in _pod_specs(doc):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "persistentVolumeClaim" in volumes[mounts["/data"]]
        # the save dir given to train.py lies on that volume
        assert "/data/checkpoints" in container["args"]
        assert pod["terminationGracePeriodSeconds"] >= 60  # stop after the step, checkpoint, exit
        assert pod["securityContext"]["runAsNonRoot"] is True
        # exec form, no shell in between: SIGTERM reaches the launcher
        assert container["command"][0] in ("python", "torchrun") and container["command"][-1].endswith("train.py")


def _arguments(doc):
    if doc["kind"] == "TrainJob":
        return doc["spec"]["trainer"]["args"]
    return _pod_specs(doc)[0]["containers"][0]["args"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_job_resumes_and_its_arguments_parse(path):
    for doc in _documents(path):
        if doc["kind"] in ("Job", "PyTorchJob", "TrainJob"):
            args = _arguments(doc)
            config = parse_config(args, environ={})
            assert config.resume == "auto" and "--resume" in args
            assert config.save_dir == "/data/checkpoints"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_job_requests_gpus(path):
    for doc in _documents(path):
        if doc["kind"] == "TrainJob":
            limits = doc["spec"]["trainer"]["resourcesPerNode"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
        elif doc["kind"] in ("Job", "PyTorchJob"):
            for pod in _pod_specs(doc):
                assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_the_trainjob_uses_the_runtime_in_its_file():
    docs = {doc["kind"]: doc for doc in _documents(DEPLOY / "k8s" / "trainjob.yaml")}
    ref = docs["TrainJob"]["spec"]["runtimeRef"]
    assert ref["kind"] == "ClusterTrainingRuntime" and ref["name"] == docs["ClusterTrainingRuntime"]["metadata"]["name"]
    (job,) = docs["ClusterTrainingRuntime"]["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"


def test_the_dockerfile_runs_the_trainer_as_pid_1_as_a_non_root_user_without_downloads():
    lines = [l.strip() for l in (DEPLOY / "Dockerfile").read_text().splitlines() if l.strip() and not l.startswith("#")]
    base = next(l for l in lines if l.startswith("ARG BASE_IMAGE="))
    assert re.fullmatch(r"ARG BASE_IMAGE=pytorch/pytorch:2\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base)
    assert "pip install --no-deps ." in " ".join(lines)  # torch comes from the base image
    user = [l for l in lines if l.startswith("USER ")][-1]
    assert user.split()[1] not in ("root", "0")
    cmd = [l for l in lines if l.startswith("CMD ")][-1]
    assert json.loads(cmd[4:]) == ["python", "/opt/resnet-ddp/train.py"]  # exec form
    assert not any(l.startswith("ENTRYPOINT") for l in lines)


def test_the_dockerfile_installs_every_dependency_the_base_image_lacks():
    pyproject = (DEPLOY.parent / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.S | re.M).group(1)
    needed = {re.split(r"[<>=!~ ]", spec, 1)[0] for spec in re.findall(r'"([^"]+)"', block)}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    installed = set(re.findall(r'"([A-Za-z0-9_.-]+)[<>=!~]', dockerfile))
    assert needed - {"torch", "torchvision", "numpy"} <= installed  # the rest come from the base image
