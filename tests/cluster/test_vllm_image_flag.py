"""`--vllm-image` (the chart's `vllmImage`) is the image of every vLLM Deployment that sets no
spec.vllm.image: the flag the chart renders is passed to the real operator process, and the
image is read off the Deployment the operator created in the real API server."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from finetune_devcluster.cluster import control_plane_binaries
from tests.fixtures.cluster import REPO_ROOT, get_json, wait_for
from tests.fixtures.inference import BASE
from tests.fixtures.operator import OperatorProcess

pytestmark = [pytest.mark.cluster]

CHART = REPO_ROOT / "charts" / "finetune-operator"
IMAGE = "registry.example/vllm-cpu:0.32.0-test"


def chart_operator_args(*values: str) -> list[str]:
    """The operator container's args as the chart renders them."""
    versions = dict(line.split("=", 1) for line in (REPO_ROOT / "hack" / "versions.env").read_text()
                    .splitlines() if line and not line.startswith("#"))
    out = subprocess.run([str(control_plane_binaries() / "helm"), "template", "finetune-operator",
                          str(CHART), "-n", "finetune-system", "--kube-version",
                          versions["KUBERNETES_VERSION"], *values],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    [deployment] = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def isvc(namespace: str, name: str, **vllm) -> dict:
    spec = {"model": {"source": BASE}, "resources": {"gpus": 1}}
    if vllm:
        spec["vllm"] = vllm
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def deployment_image(cluster, namespace: str, name: str) -> str:
    def image():
        found = cluster.kubectl("get", "deployment", name, "-n", namespace, "-o", "json", check=False)
        if found.returncode != 0:
            return None
        return json.loads(found.stdout)["spec"]["template"]["spec"]["containers"][0]["image"]

    return wait_for(image, timeout=60, what=f"the vLLM Deployment {name}")


def test_the_charts_vllm_image_is_the_image_of_the_vllm_deployment(cluster, crds, namespace, tmp_path):
    repository, tag = IMAGE.rsplit(":", 1)
    args = chart_operator_args("--set", f"vllmImage.repository={repository}", "--set", f"vllmImage.tag={tag}")
    flags = [a for a in args if a.startswith("--vllm-image")]
    assert flags == [f"--vllm-image={IMAGE}"]
    operator = OperatorProcess(cluster, namespace, tmp_path / "operator.log", flags).start()
    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(isvc(namespace, "default-image")))
        cluster.kubectl("apply", "-f", "-", input=json.dumps(isvc(namespace, "own-image", image="example/own:1")))

        assert deployment_image(cluster, namespace, "default-image") == IMAGE
        assert deployment_image(cluster, namespace, "own-image") == "example/own:1"  # the spec wins
    except BaseException:
        print(operator.tail(150))
        raise
    finally:
        operator.stop()
    assert get_json(cluster, "inferenceservice", "default-image", "-n", namespace)["spec"]["model"]["source"] == BASE
