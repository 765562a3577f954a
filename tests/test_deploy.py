"""The container image and the Kubernetes manifests keep the properties a platform relies on."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubeflow.training import ApiClient
from kubeflow.training.utils.utils import FakeResponse
from kubeflow_trainer_api import models as trainer_models

from resnet_ddp.entry.cli import parse_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
METRICS_PORT_NAME = "metrics"  # the container port that --metrics-port serves and the PodMonitor scrapes
# The volume types the restricted Pod Security Standard admits.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pod_templates(doc):
    """Every pod template (metadata and spec) in a Job, PyTorchJob, ClusterTrainingRuntime or TrainingRuntime."""
    kind = doc["kind"]
    if kind == "Job":
        return [doc["spec"]["template"]]
    if kind == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if kind in RUNTIME_KINDS:
        return [j["template"]["spec"]["template"] for j in doc["spec"]["template"]["spec"]["replicatedJobs"]]
    return []


def _pod_specs(doc):
    return [template["spec"] for template in _pod_templates(doc)]


def _workloads():
    return [(path.name, doc) for path in MANIFESTS for doc in _documents(path) if _pod_specs(doc)]


def test_the_three_launch_paths_have_a_manifest():
    kinds = {(doc["apiVersion"], doc["kind"]) for path in MANIFESTS for doc in _documents(path)}
    assert {
        ("batch/v1", "Job"),
        ("kubeflow.org/v1", "PyTorchJob"),
        ("trainer.kubeflow.org/v1alpha1", "TrainJob"),
        ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"),
        ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"),
    } <= kinds


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
            assert config.checkpoint.resume == "auto" and "--resume" in args
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


def _trainjobs():
    """(file, TrainJob, the runtime its runtimeRef names in the same file) for every TrainJob."""
    found = []
    for path in MANIFESTS:
        docs = _documents(path)
        for doc in docs:
            if doc["kind"] == "TrainJob":
                ref = doc["spec"]["runtimeRef"]
                runtime = next(d for d in docs if (d["kind"], d["metadata"]["name"]) == (ref["kind"], ref["name"]))
                found.append((path.name, doc, runtime))
    return found


def test_every_trainjob_uses_a_runtime_in_its_file():
    assert _trainjobs()
    for _, trainjob, runtime in _trainjobs():
        assert trainjob["spec"]["runtimeRef"]["apiGroup"] == "trainer.kubeflow.org"
        (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
        assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"


def test_a_trainjob_runs_on_a_namespaced_runtime_as_well_as_on_the_cluster_one():
    # many users may create objects only in their namespace, not cluster-scoped ones
    assert {runtime["kind"] for _, _, runtime in _trainjobs()} == set(RUNTIME_KINDS)
    runtimes = {doc["kind"]: doc for path in MANIFESTS for doc in _documents(path) if doc["kind"] in RUNTIME_KINDS}
    assert (
        "namespace" not in runtimes["TrainingRuntime"]["metadata"]
    )  # the TrainJob's namespace, wherever it is applied
    # one runtime, two scopes: they must not drift apart
    assert runtimes["TrainingRuntime"]["spec"] == runtimes["ClusterTrainingRuntime"]["spec"]
    assert runtimes["TrainingRuntime"]["metadata"]["labels"] == runtimes["ClusterTrainingRuntime"]["metadata"]["labels"]


@pytest.mark.parametrize("name,doc", _workloads(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_container_passes_the_restricted_pod_security_standard(name, doc):
    # What a namespace labelled pod-security.kubernetes.io/enforce=restricted admits (Pod Security Standards).
    for pod in _pod_specs(doc):
        assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
        assert all(set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES for volume in pod["volumes"])
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context.get("privileged") is not True
            assert "ALL" in context["capabilities"]["drop"]
            assert set(context["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
            assert context["seccompProfile"]["type"] == "RuntimeDefault"
            assert context["runAsNonRoot"] is True
            assert context.get("runAsUser", pod["securityContext"].get("runAsUser")) != 0
            assert not any("hostPort" in port for port in container.get("ports", []))


@pytest.mark.parametrize("name,doc", _workloads(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_container_leaves_the_cause_of_a_failure_in_its_termination_message(name, doc):
    # the program writes no termination message file: on a failure the last log lines take its place,
    # so `kubectl describe pod` shows the one-line refusal or the traceback
    for pod in _pod_specs(doc):
        assert all(c["terminationMessagePolicy"] == "FallbackToLogsOnError" for c in pod["containers"])


@pytest.mark.parametrize("name,doc", _workloads(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_pod_carries_the_recommended_labels_and_a_named_metrics_port(name, doc):
    for template in _pod_templates(doc):
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "resnet-ddp"
        assert all(labels.get(key) for key in ("app.kubernetes.io/component", "app.kubernetes.io/part-of"))
        (container,) = template["spec"]["containers"]
        (port,) = [p for p in container.get("ports", []) if p.get("name") == METRICS_PORT_NAME]
        # the port the program serves is the one the pod declares
        assert parse_config(container["args"], environ={}).reporting.metrics_port == port["containerPort"]


@pytest.mark.parametrize("name,trainjob,runtime", _trainjobs(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_trainjob_serves_metrics_on_the_port_its_runtime_declares(name, trainjob, runtime):
    # the TrainJob's trainer.args replace the runtime container's args, so they must name the port again
    for pod in _pod_specs(runtime):
        (port,) = [p for p in pod["containers"][0]["ports"] if p.get("name") == METRICS_PORT_NAME]
        assert (
            parse_config(trainjob["spec"]["trainer"]["args"], environ={}).reporting.metrics_port
            == port["containerPort"]
        )


def _pod_monitors():
    return [doc for path in MANIFESTS for doc in _documents(path) if doc["kind"] == "PodMonitor"]


# The fields of the Prometheus Operator's PodMonitor (monitoring.coreos.com/v1) that a manifest here may use. No
# schema for it is bundled with the validators below, so a misspelt field is caught here instead.
PODMONITOR_SPEC_FIELDS = {
    "selector",
    "namespaceSelector",
    "podMetricsEndpoints",
    "jobLabel",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
    "attachMetadata",
}
PODMONITOR_ENDPOINT_FIELDS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "honorTimestamps",
    "relabelings",
    "metricRelabelings",
    "params",
    "filterRunning",
}


def test_the_podmonitor_is_well_formed():
    (monitor,) = _pod_monitors()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"} and monitor["metadata"]["name"]
    assert set(monitor["spec"]) <= PODMONITOR_SPEC_FIELDS
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"} and selector["matchLabels"]
    assert all(isinstance(value, str) for value in selector["matchLabels"].values())
    assert monitor["spec"]["podMetricsEndpoints"]
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert set(endpoint) <= PODMONITOR_ENDPOINT_FIELDS
        assert isinstance(endpoint["port"], str) and endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint.get("interval", "30s"))


def test_the_podmonitor_scrapes_the_metrics_port_of_every_pod():
    (monitor,) = _pod_monitors()
    wanted = monitor["spec"]["selector"]["matchLabels"]
    ports = {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    for name, doc in _workloads():
        for template in _pod_templates(doc):
            assert wanted.items() <= template["metadata"].get("labels", {}).items(), f"{name}: {doc['kind']}"
            for container in template["spec"]["containers"]:
                assert ports <= {port.get("name") for port in container.get("ports", [])}, f"{name}: {doc['kind']}"


def _pod_failure_action(policy, exit_codes, conditions=()):
    """The action of the first rule of a podFailurePolicy that matches a failed pod, as the Job controller
    evaluates them (in order; exit code 0 never matches), or None: then the failure counts towards backoffLimit.
    exit_codes: {container name: exit code}; conditions: the types of the pod's conditions that are True."""
    for rule in policy["rules"]:
        codes = rule.get("onExitCodes")
        if codes:
            seen = [
                code
                for container, code in exit_codes.items()
                if code != 0 and codes.get("containerName") in (None, container)
            ]
            if any((code in codes["values"]) == (codes["operator"] == "In") for code in seen):
                return rule["action"]
        if any(
            pattern["type"] in conditions and pattern.get("status", "True") == "True"
            for pattern in rule.get("onPodConditions", [])
        ):
            return rule["action"]
    return None


def test_the_job_fails_at_once_on_a_refusal_and_does_not_count_disruptions():
    (job,) = [doc for doc in _documents(DEPLOY / "k8s" / "job.yaml") if doc["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # the API server refuses a podFailurePolicy without it
    policy = job["spec"]["podFailurePolicy"]
    trainer = pod["containers"][0]["name"]
    # exit 2: bad input or an unusable setup, refused before training; a retry would be refused again
    assert _pod_failure_action(policy, {trainer: 2}) == "FailJob"
    # preempted, evicted or drained (the pod's DisruptionTarget condition): stopped after a checkpoint, or killed
    for code in (143, 137, 1):
        assert _pod_failure_action(policy, {trainer: code}, ["DisruptionTarget"]) == "Ignore"
    # a failure during the run, or a plain `kubectl delete pod`: retried up to backoffLimit, resumes from its checkpoint
    for code in (1, 143):
        assert _pod_failure_action(policy, {trainer: code}) is None


def test_the_dockerfile_runs_the_trainer_as_pid_1_as_a_non_root_user_without_downloads():
    lines = [l.strip() for l in (DEPLOY / "Dockerfile").read_text().splitlines() if l.strip() and not l.startswith("#")]
    base = next(l for l in lines if l.startswith("ARG BASE_IMAGE="))
    assert re.fullmatch(
        r"ARG BASE_IMAGE=pytorch/pytorch:2\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?", base
    )
    assert "pip install --no-deps ." in " ".join(lines)  # torch comes from the base image
    user = [l for l in lines if l.startswith("USER ")][-1]
    assert user.split()[1] not in ("root", "0")
    cmd = [l for l in lines if l.startswith("CMD ")][-1]
    assert json.loads(cmd[4:]) == ["python", "/opt/resnet-ddp/train.py"]  # exec form
    assert not any(l.startswith("ENTRYPOINT") for l in lines)


# Schema validation (docs/kubernetes.md, "How the manifests are validated").
# Kubeflow Trainer's minimum Kubernetes, and the newest that kubernetes-validate 1.37 bundles.
KUBERNETES_VERSIONS = ("1.31", "1.37")


def _all_documents():
    return [(f"{path.name}:{doc['kind']}", doc) for path in MANIFESTS for doc in _documents(path)]


# Kinds that no validator here has a schema for, checked field by field in their own tests.
HAND_CHECKED_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}  # test_the_podmonitor_is_well_formed


def _kubernetes_objects(doc):
    """What the Kubernetes schemas cover in a document, as (where, object) pairs: a core object whole; the pod
    templates of a PyTorchJob as core/v1 PodTemplates and the job templates of a ClusterTrainingRuntime or
    TrainingRuntime (batch/v1 JobTemplateSpecs) as Jobs, the objects that hold exactly those types."""
    kind = doc["kind"]
    if kind == "PyTorchJob":
        return [
            (
                f"pytorchReplicaSpecs.{role}.template",
                {"apiVersion": "v1", "kind": "PodTemplate", "template": replica["template"]},
            )
            for role, replica in doc["spec"]["pytorchReplicaSpecs"].items()
        ]
    if kind in RUNTIME_KINDS:
        return [
            (f"replicatedJobs[{job['name']}].template", {"apiVersion": "batch/v1", "kind": "Job", **job["template"]})
            for job in doc["spec"]["template"]["spec"]["replicatedJobs"]
        ]
    if kind == "TrainJob" or (doc["apiVersion"], kind) in HAND_CHECKED_KINDS:
        return []  # no template inside; the Trainer API models, or the kind's own test, check it
    return [("", doc)]  # an unknown kind has no schema and fails


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "name,doc", [pytest.param(name, doc, id=name) for name, doc in _all_documents() if _kubernetes_objects(doc)]
)
def test_every_core_object_and_pod_template_matches_the_kubernetes_schema(name, doc, version):
    errors = []
    for where, obj in _kubernetes_objects(doc):
        try:
            # strict: additionalProperties false, so a misspelt field fails as well as a wrong type
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{' '.join(filter(None, (name, where)))}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, f"Kubernetes {version}: " + "\n".join(errors)


def _differences(given, returned, path=()):
    """Where the object a model library returns differs from the manifest: a field it dropped is unknown to
    the schema; a value that changed type was coerced. A Quantity (resources.limits/requests, sizeLimit) may
    be a number in YAML; the kubernetes client types it as a string, the Trainer API as float or string, so
    a number may come back there as its str() or float()."""
    where = ".".join(map(str, path))
    if isinstance(given, dict) and isinstance(returned, dict):
        found = [f"{where}.{key}: unknown field" for key in sorted(given.keys() - returned.keys())]
        found += [f"{where}.{key}: added" for key in sorted(returned.keys() - given.keys())]
        for key in sorted(given.keys() & returned.keys()):
            found += _differences(given[key], returned[key], path + (key,))
        return found
    if isinstance(given, list) and isinstance(returned, list) and len(given) == len(returned):
        return [d for i, (g, r) in enumerate(zip(given, returned)) for d in _differences(g, r, path + (i,))]
    if type(given) is type(returned) and given == returned:
        return []
    quantity = path[-2:-1] in (("limits",), ("requests",)) or path[-1:] == ("sizeLimit",)
    if (
        quantity
        and type(given) in (int, float)
        and any(type(returned) is type(form) and returned == form for form in (str(given), float(given)))
    ):
        return []
    return [f"{where}: {given!r} came back as {returned!r}"]


def _kubeflow_round_trip(doc):
    """A Kubeflow object read into its typed Python models and written back to a dict. kubeflow-training (v1):
    openapi-generator classes, read the way its TrainingClient reads a job from the API server; they keep only
    the fields they know and coerce primitives (int("3")). kubeflow-trainer-api: pydantic models with strict
    field types (a string for an int raises) that ignore unknown fields."""
    api = (doc["apiVersion"], doc["kind"])
    if api == ("kubeflow.org/v1", "PyTorchJob"):
        client = ApiClient()
        return client.sanitize_for_serialization(client.deserialize(FakeResponse(doc), "KubeflowOrgV1PyTorchJob"))
    if api[0] == "trainer.kubeflow.org/v1alpha1" and api[1] in ("TrainJob",) + RUNTIME_KINDS:
        return getattr(trainer_models, f"TrainerV1alpha1{doc['kind']}").from_dict(doc).to_dict()
    raise AssertionError(f"no Kubeflow models for {api}")


@pytest.mark.parametrize(
    "name,doc",
    [pytest.param(name, doc, id=name) for name, doc in _all_documents() if "kubeflow.org/" in doc["apiVersion"]],
)
def test_every_kubeflow_object_matches_the_kubeflow_models(name, doc):
    # the models drop unknown fields and coerce types silently: the round trip must give the manifest again
    differences = _differences(doc, _kubeflow_round_trip(doc))
    assert not differences, "\n".join(differences)


def test_every_document_and_every_pod_template_is_schema_checked():
    kubeflow = {name for name, doc in _all_documents() if "kubeflow.org/" in doc["apiVersion"]}
    kubernetes = {name for name, doc in _all_documents() if _kubernetes_objects(doc)}
    by_hand = {name for name, doc in _all_documents() if (doc["apiVersion"], doc["kind"]) in HAND_CHECKED_KINDS}
    assert {name for name, _ in _all_documents()} == kubeflow | kubernetes | by_hand
    assert all(_kubernetes_objects(doc) for _, doc in _workloads())  # the pod specs above, against core/v1


def _dockerfile_instructions():
    """The Dockerfile's instructions as (keyword, arguments), continued lines joined, comments left out."""
    instructions, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        current += " " + line.strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        keyword, _, arguments = current.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def _copy_sources(arguments):
    words = [w for w in arguments.split() if not w.startswith("--")]
    return words[:-1]


def _dependency_install():
    """(index, arguments) of the RUN that installs the dependencies: the pip install without --no-deps."""
    found = [
        (i, args)
        for i, (keyword, args) in enumerate(_dockerfile_instructions())
        if keyword == "RUN" and "pip install" in args and "--no-deps" not in args
    ]
    assert len(found) == 1, "one RUN of its own installs the dependencies, apart from `pip install --no-deps .`"
    return found[0]


def _pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python before 3.11: the copy that pip carries
        from pip._vendor import tomli as tomllib
    return tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())


def _name(requirement):
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_dockerfile_installs_the_dependencies_before_it_copies_the_code():
    # a code change must not run the dependency install again: that layer may depend on pyproject.toml (and
    # files of deploy/) alone
    instructions = _dockerfile_instructions()
    deps, _ = _dependency_install()
    copies = [(i, _copy_sources(args)) for i, (keyword, args) in enumerate(instructions) if keyword in ("COPY", "ADD")]
    for i, sources in copies:
        if i < deps:
            assert all(source == "pyproject.toml" or source.startswith("deploy/") for source in sources), sources
    (code,) = [i for i, sources in copies if "resnet_ddp" in sources]
    (package,) = [
        i for i, (keyword, args) in enumerate(instructions) if keyword == "RUN" and "pip install --no-deps ." in args
    ]
    assert deps < code < package


def test_the_image_installs_every_dependency_and_tensorboard_and_matplotlib():
    # the requirements the dependency step installs: deploy/image_requirements.py, run as the Dockerfile runs it
    _, run = _dependency_install()
    arguments = re.search(r"image_requirements\.py((?:\s+[\w.-]+)+)", run).group(1).split()
    printed = subprocess.run(
        [sys.executable, str(DEPLOY / "image_requirements.py"), *arguments],
        cwd=DEPLOY.parent,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    installed = {_name(r) for r in printed if r.strip()}
    needed = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    assert needed | {"tensorboard", "matplotlib"} <= installed  # --tensorboard and `resnet-ddp report` work in a pod
    # torch, torchvision and numpy stay the base image's (its CUDA build of torch): pinned by a constraints file
    constraints = re.search(r"grep -iE '\^\(([\w|]+)\)==' > (\S+)", run)
    assert constraints, "the base image's versions of torch, torchvision and numpy are written to a constraints file"
    assert set(constraints.group(1).split("|")) == {"numpy", "torch", "torchvision"}
    assert f"-c {constraints.group(2)}" in run


def _oci_labels():
    defaults = dict(args.partition("=")[::2] for keyword, args in _dockerfile_instructions() if keyword == "ARG")
    labels = {}
    for keyword, args in _dockerfile_instructions():
        if keyword == "LABEL":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                labels[key] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], value)
    return labels


def test_the_image_carries_the_oci_labels():
    labels = _oci_labels()
    project = _pyproject()["project"]
    oci = "org.opencontainers.image."
    assert labels[oci + "title"] == project["name"]
    assert labels[oci + "description"] == project["description"]
    assert labels[oci + "version"] == project["version"]
    license = project["license"]
    assert labels[oci + "licenses"] == "Apache-2.0" == (license if isinstance(license, str) else license["text"])
    assert re.fullmatch(r"https://\S+", labels[oci + "source"])


def test_the_image_exposes_the_metrics_port_the_manifests_declare():
    exposed = {
        int(port.split("/")[0])
        for keyword, args in _dockerfile_instructions()
        if keyword == "EXPOSE"
        for port in args.split()
    }
    declared = {
        port["containerPort"]
        for _, doc in _workloads()
        for pod in _pod_specs(doc)
        for container in pod["containers"]
        for port in container.get("ports", [])
        if port.get("name") == METRICS_PORT_NAME
    }
    assert declared and exposed == declared


def test_the_build_context_holds_what_the_dockerfile_copies():
    # deploy/Dockerfile.dockerignore (BuildKit reads it beside the Dockerfile): the context is what the image
    # copies, not the whole checkout (a virtualenv, checkpoints, bench results)
    ignore = [
        l.strip()
        for l in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if l.strip() and not l.startswith("#")
    ]
    assert ignore[0] == "*"
    kept = {l[1:] for l in ignore if l.startswith("!")}
    copied = {
        source for keyword, args in _dockerfile_instructions() if keyword == "COPY" for source in _copy_sources(args)
    }
    assert copied <= kept
    assert all((DEPLOY.parent / source).exists() for source in copied)
