"""spec.deploy's replicas/gpus/nodeSelector/tolerations/vllm reach an InferenceService that
already exists (issue 17: only a newly created one honoured them), a second job that asks
the same shared server for another value is held back with a DeployConflict naming the field,
and editing a deployed job's spec.deploy applies the new value.

The whole operator runs as a real process against the real control plane; trainer pods and
vLLM pods run on kwok's fake GPU nodes (kwok completes the trainer at once and makes the vLLM
pods Ready without running vLLM): what is checked is the Deployment the API server holds.
"""

from __future__ import annotations

import json

import pytest

from tests.cluster.test_operator_lifecycle import _deployed, apply, ftj, status
from tests.fixtures.cluster import get_json, wait_for

pytestmark = pytest.mark.cluster

NODE = {"kubernetes.io/hostname": "gpu-node-1"}
TOLERATION = {"key": "finetune.dev/serving", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}


def _server(namespace: str) -> dict:
    """An InferenceService made by hand before any job deploys into it: 1 replica, 1 GPU,
    vLLM defaults, serving the base model only."""
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "shared", "namespace": namespace},
            "spec": {"model": {"source": "org/tiny"}, "replicas": 1, "resources": {"gpus": 1}}}


def _vllm_container(cluster, namespace) -> dict:
    d = get_json(cluster, "deployment", "shared", "-n", namespace)
    return d, d["spec"]["template"]["spec"]["containers"][0]


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_an_existing_server_takes_the_deploying_jobs_settings_and_a_conflicting_job_waits(
        cluster, namespace, operator):
    apply(cluster, namespace, _server(namespace))
    wait_for(lambda: cluster.kubectl("get", "deployment", "shared", "-n", namespace, check=False).returncode == 0,
             timeout=90, what="the hand-made server's Deployment")
    before, container = _vllm_container(cluster, namespace)
    assert before["spec"]["replicas"] == 1 and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert _arg(container["command"], "--dtype") == "auto"

    deploy = {"inferenceService": "shared", "replicas": 2, "gpus": 2, "nodeSelector": NODE,
              "tolerations": [TOLERATION], "vllm": {"maxLoraRank": 32, "maxModelLen": 512, "dtype": "float16"}}
    apply(cluster, namespace, ftj("first", deploy=deploy))
    _deployed(cluster, namespace, "first", "shared")

    isvc = get_json(cluster, "inferenceservice", "shared", "-n", namespace)
    assert isvc["spec"]["replicas"] == 2 and isvc["spec"]["resources"]["gpus"] == 2
    d, container = _vllm_container(cluster, namespace)
    pod = d["spec"]["template"]["spec"]
    assert d["spec"]["replicas"] == 2
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"]["kubernetes.io/hostname"] == "gpu-node-1"
    assert TOLERATION in pod["tolerations"]
    assert (_arg(container["command"], "--max-lora-rank"), _arg(container["command"], "--max-model-len"),
            _arg(container["command"], "--dtype")) == ("32", "512", "float16")

    # Another job asks the same server for 3 replicas: not added, the server unchanged.
    apply(cluster, namespace, ftj("second", deploy={"inferenceService": "shared", "replicas": 3}))

    def conflict():
        s = status(cluster, namespace, "second")
        held = [c for c in s.get("conditions", []) if c.get("reason") == "DeployConflict"]
        return s.get("phase") == "Deploying" and held and held[0]
    held = wait_for(conflict, timeout=180, what="second to be held with DeployConflict")
    assert "spec.deploy.replicas is 3 here but 2 in FineTuneJob first" in held["message"]
    isvc = get_json(cluster, "inferenceservice", "shared", "-n", namespace)
    assert [a["name"] for a in isvc["spec"]["adapters"]] == ["first"] and isvc["spec"]["replicas"] == 2
    assert get_json(cluster, "deployment", "shared", "-n", namespace)["spec"]["replicas"] == 2

    # It agrees once its replicas is unset: added, and the first job's settings stay.
    cluster.kubectl("patch", "ftj", "second", "-n", namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"deploy": {"replicas": None}}}))
    _deployed(cluster, namespace, "second", "shared")
    isvc = get_json(cluster, "inferenceservice", "shared", "-n", namespace)
    assert [a["name"] for a in isvc["spec"]["adapters"]] == ["first", "second"]
    assert isvc["spec"]["replicas"] == 2 and isvc["spec"]["vllm"]["maxLoraRank"] == 32

    # Changing a deployed job's spec.deploy applies the new value: it deploys again.
    cluster.kubectl("patch", "ftj", "first", "-n", namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"deploy": {"replicas": 3}}}))
    wait_for(lambda: get_json(cluster, "deployment", "shared", "-n", namespace)["spec"]["replicas"] == 3,
             timeout=120, what="the Deployment scaled to the edited deploy.replicas")
    _deployed(cluster, namespace, "first", "shared")
