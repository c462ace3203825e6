"""The InferenceService's HorizontalPodAutoscaler as the operator renders it, applied to the
dev cluster's real API server (autoscaling/v2 is built in, so its own validation is the
upstream schema). No metrics pipeline runs here (no metrics-server or prometheus-adapter), so
this shows the object is valid and kept as written, not that it scales; KEDA's ScaledObject is
not checked (its CRD is not installed here).

minReplicas 0 is what KEDA can do; the API server refuses an HPA with minReplicas 0 (the
HPAScaleToZero feature gate is off by default), which is why the HPA's floor is 1."""

from __future__ import annotations

import json

import pytest

from finetune_operator.serving import autoscaling
from tests.fixtures.inference import inferenceservice, parse

pytestmark = pytest.mark.cluster


def rendered_hpa(namespace: str, min_replicas: int) -> dict:
    isvc, _ = parse(inferenceservice("support", namespace=namespace,
                                     autoscaling={"minReplicas": min_replicas, "maxReplicas": 4,
                                                  "targetRequestsWaiting": 3}))
    hpa = autoscaling.build_hpa(isvc)
    hpa["metadata"].pop("ownerReferences", None)  # no InferenceService object to own it here
    return hpa


def test_the_rendered_hpa_is_accepted_and_kept_by_the_api_server(cluster, namespace):
    hpa = rendered_hpa(namespace, 2)

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(hpa))

    stored = json.loads(cluster.kubectl("get", "hpa", "support", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["minReplicas"] == 2 and stored["spec"]["maxReplicas"] == 4
    assert stored["spec"]["metrics"] == hpa["spec"]["metrics"]
    assert stored["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_min_replicas_zero_renders_a_floor_of_one_because_the_api_server_refuses_zero(cluster, namespace):
    hpa = rendered_hpa(namespace, 0)
    assert hpa["spec"]["minReplicas"] == 1

    hpa["spec"]["minReplicas"] = 0
    refused = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(hpa), check=False)
    assert refused.returncode != 0 and "minReplicas" in refused.stderr
