"""The InferenceService's HorizontalPodAutoscaler as the operator renders it, applied to the
dev cluster's real API server (autoscaling/v2 is built in, so its own validation is the
upstream schema), and KEDA's ScaledObject applied after installing KEDA's own CRD (from the
pinned Go module github.com/kedacore/keda/v2, hack/fetch-keda-crd.sh) with strict field
validation. No metrics pipeline or KEDA operator runs here (no metrics-server,
prometheus-adapter or keda-operator), so this shows the objects are valid and kept as written,
not that they scale.

minReplicas 0 is what KEDA can do; the API server refuses an HPA with minReplicas 0 (the
HPAScaleToZero feature gate is off by default), which is why the HPA's floor is 1."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest

from finetune_operator.serving import autoscaling
from tests.fixtures.cluster import REPO_ROOT, get_json
from tests.fixtures.inference import inferenceservice, parse

pytestmark = pytest.mark.cluster


def rendered(namespace: str, min_replicas: int, build=autoscaling.build_hpa) -> dict:
    """The HPA (or with `build`, the ScaledObject) of an autoscaled InferenceService."""
    isvc, _ = parse(inferenceservice("support", namespace=namespace,
                                     autoscaling={"minReplicas": min_replicas, "maxReplicas": 4,
                                                  "targetRequestsWaiting": 3}))
    obj = build(isvc)
    obj["metadata"].pop("ownerReferences", None)  # no InferenceService object to own it here
    return obj


def test_the_rendered_hpa_is_accepted_and_kept_by_the_api_server(cluster, namespace):
    hpa = rendered(namespace, 2)

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(hpa))

    stored = json.loads(cluster.kubectl("get", "hpa", "support", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["minReplicas"] == 2 and stored["spec"]["maxReplicas"] == 4
    assert stored["spec"]["metrics"] == hpa["spec"]["metrics"]
    assert stored["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_min_replicas_zero_renders_a_floor_of_one_because_the_api_server_refuses_zero(cluster, namespace):
    hpa = rendered(namespace, 0)
    assert hpa["spec"]["minReplicas"] == 1

    hpa["spec"]["minReplicas"] = 0
    refused = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(hpa), check=False)
    assert refused.returncode != 0 and "minReplicas" in refused.stderr


@pytest.fixture
def keda_crd(cluster):
    """KEDA's ScaledObject CRD on the API server for this test only: with it installed the
    operator renders ScaledObjects instead of HPAs, which other tests do not expect."""
    path = subprocess.run(["bash", str(REPO_ROOT / "hack" / "fetch-keda-crd.sh")], check=True,
                          capture_output=True, text=True, timeout=300).stdout.strip()
    cluster.kubectl("apply", "--server-side", "-f", path)
    cluster.wait_established("scaledobjects.keda.sh")
    yield
    cluster.kubectl("delete", "crd", "scaledobjects.keda.sh", "--wait=true", "--timeout=60s")


def test_the_rendered_scaled_object_is_valid_under_kedas_own_crd(cluster, namespace, keda_crd):
    so = rendered(namespace, 0, autoscaling.build_scaled_object)  # scale to zero: what KEDA adds over the HPA

    cluster.kubectl("create", "--validate=strict", "-n", namespace, "-f", "-", input=json.dumps(so))

    stored = get_json(cluster, "scaledobjects.keda.sh", "support", "-n", namespace)
    assert {k: stored["spec"][k] for k in so["spec"]} == so["spec"], "kept as rendered, nothing pruned"
    assert stored["spec"]["minReplicaCount"] == 0

    # The schema really is checked: a field KEDA does not have, or a number where KEDA's
    # trigger metadata takes strings, is refused.
    for path, value, named in ((("spec", "minReplicas"), 1, "minReplicas"),
                               (("spec", "triggers", 0, "metadata", "threshold"), 3, "threshold")):
        bad = copy.deepcopy(so)
        bad["metadata"]["name"] = "bad"
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        refused = cluster.kubectl("create", "--validate=strict", "--dry-run=server", "-n", namespace,
                                  "-f", "-", input=json.dumps(bad), check=False)
        assert refused.returncode != 0 and named in refused.stderr, refused.stderr
