"""`make demo` (on the real node, its default since #15), asserted: every pod from the project's images on the
real node (kubelet + containerd + runc, CNI pod IPs, kube-proxy).

The operator runs from its image (installed with the Helm chart), the trainer pod from the
trainer image as UID 1000 writing to the claim, vLLM from the vLLM CPU image; the
InferenceService's Service has the vLLM pod's IP as its endpoint, and this machine reaches
the printed INFERENCE_URL. No GPU here: the trainer and vLLM run on CPU (torch's CUDA wheels
are in the images, unused). Run with FINETUNE_NODE=kubelet: ~26 min on a loaded 2-core machine
with warm images, beyond the default suite's budget (docs/real-node.md). The pods have their
own IPs, so it binds no host port and needs no vLLM port lock.
"""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from finetune_api.layout import job_folder
from finetune_devcluster.cluster import free_port
from finetune_devcluster.demo import JOB, NAMESPACE, OPERATOR_NAMESPACE, VLLM_PORT, Demo
from tests.fixtures.cluster import get_json, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(3600),
              pytest.mark.skipif(os.environ.get("FINETUNE_NODE") != "kubelet",
                                 reason="the real-node demo test runs with FINETUNE_NODE=kubelet (~26 min; docs/real-node.md)")]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_demo_on_the_real_node_runs_every_pod_from_the_projects_images(tmp_path):
    demo = Demo(tmp_path / "demo", metrics_port=free_port(), liveness_port=free_port(),
                openai_api_port=free_port(), timeout=1500)
    assert demo.real_node
    try:
        result = demo.up()
        c = demo.cluster
        refs = c.image_refs
        assert [r["model"] for r in result["comparison"]["rows"]] == ["base", "fine-tuned"]
        assert all(row["fine-tuned"] for row in result["answers"])

        # Each pod ran from the project's image for its role, on the node `local`.
        operators = get_json(c, "pods", "-n", OPERATOR_NAMESPACE, "-l",
                             "app.kubernetes.io/name=finetune-operator")["items"]
        trainers = get_json(c, "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=trainer")["items"]
        servers = get_json(c, "pods", "-n", NAMESPACE, "-l", f"finetune.dev/inferenceservice={JOB}")["items"]
        for pods, image in ((operators, refs["operator"]), (trainers, refs["trainer"]), (servers, refs["vllm"])):
            assert pods, image
            for p in pods:
                assert p["spec"]["nodeName"] == "local" and p["status"]["podIP"].startswith("10.88."), p["status"]
                assert p["spec"]["containers"][0]["image"] == image
        # The trainer ran as the image's user and wrote the adapter to the claim as it.
        adapter = demo.claim_path() / job_folder(JOB, shared_claim=True) / "artifacts" / "adapter"
        owners = {f.name: f.stat().st_uid for f in adapter.iterdir()}
        assert "adapter_config.json" in owners and set(owners.values()) == {1000}, owners

        # The vLLM Service's endpoints are the vLLM pod's IP; this machine reaches both the pod
        # and the Service (ClusterIP, kube-proxy): the INFERENCE_URL the demo printed.
        ready = [p for p in servers if p["metadata"].get("deletionTimestamp") is None]
        pod_ips = sorted(p["status"]["podIP"] for p in ready)

        def endpoints():
            slices = get_json(c, "endpointslices", "-n", NAMESPACE, "-l", f"kubernetes.io/service-name={JOB}")
            ips = sorted(a for s in slices["items"] for e in s.get("endpoints") or []
                         if (e.get("conditions") or {}).get("ready") for a in e["addresses"])
            return ips or None
        assert wait_for(endpoints, timeout=60, what=f"ready endpoints of Service {JOB}") == pod_ips
        url = demo.wait_serving()
        cluster_ip = get_json(c, "service", JOB, "-n", NAMESPACE)["spec"]["clusterIP"]
        assert url == f"http://{cluster_ip}:{VLLM_PORT}/v1"
        assert JOB in {m["id"] for m in _get(f"{url}/models")["data"]}
        assert JOB in {m["id"] for m in _get(f"http://{pod_ips[0]}:{VLLM_PORT}/v1/models")["data"]}
    finally:
        demo.stop()
