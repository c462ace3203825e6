"""The control plane under the operator fails: kube-apiserver and etcd restarted, a node deleted.

These tests restart components and delete nodes, so they run on their own small cluster
(module-scoped), not on the session's. Trainer pods run on kwok nodes this file adds; a pod
that must keep "training" gets kwok's completion-delay annotation before a node is labelled
for it, and when it must finish at a chosen moment its status is written as a kubelet would
(a simulation, said so in each test).
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from finetune_devcluster.cluster import Cluster, KWOK_NODE_ANNOTATION
from finetune_devcluster.manifests import node_status
from tests.fixtures.cluster import REPO_ROOT, get_json, wait_for
from tests.fixtures.operator import ReplicatedOperator
from tests.cluster.test_operator_lifecycle import apply, ftj, status, trainer_jobs, trainer_pods

pytestmark = [pytest.mark.reliability, pytest.mark.cluster, pytest.mark.slow]

TEST_NODE_LABEL = "finetune.dev/test-node"


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory):
    # The local node agent also provisions the trainers' claims (the default StorageClass).
    c = Cluster(tmp_path_factory.mktemp("restartable-cluster"))
    c.start()
    c.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    c.wait_established("finetunejobs.finetune.dev")
    yield c
    c.stop()


@pytest.fixture
def own_namespace(own_cluster):
    name = f"r-{uuid.uuid4().hex[:8]}"
    own_cluster.kubectl("create", "namespace", name)
    wait_for(lambda: own_cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
             timeout=30, what="the default ServiceAccount")
    return name


@pytest.fixture
def operator(own_cluster, own_namespace, tmp_path):
    """Two leader-electing replicas against this module's cluster, as the chart runs them (named
    `operator` so a failing test gets their logs). A leader that cannot renew its Lease while
    the API server is away exits and is started again, as the kubelet would."""
    replicas = ReplicatedOperator(own_cluster, own_namespace, tmp_path, [])
    replicas.start()
    yield replicas
    replicas.stop()


def add_kwok_node(cluster, name: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "annotations": {KWOK_NODE_ANNOTATION: "fake"},
            "labels": {"kubernetes.io/hostname": name, "type": "kwok"}}}))
    cluster.kubectl("patch", "node", name, "--subresource=status", "--type=merge",
                    "-p", json.dumps(node_status(name, True)))


def training_on(cluster, namespace: str, name: str, node: str) -> dict:
    """A FineTuneJob whose pod runs on `node` and stays running (kwok delays its completion)."""
    label = f"{namespace}-{name}"
    apply(cluster, namespace, ftj(name, resources={"nodeSelector": {TEST_NODE_LABEL: label}}))
    pod = wait_for(lambda: trainer_pods(cluster, namespace, name), timeout=60, what=f"{name}'s pod")[0]
    # kwok waits a random time between delay and jitter-delay (default 5 s) before completing.
    cluster.kubectl("annotate", "pod", pod["metadata"]["name"], "-n", namespace,
                    "pod-complete.stage.kwok.x-k8s.io/delay=600s",
                    "pod-complete.stage.kwok.x-k8s.io/jitter-delay=610s")
    cluster.kubectl("label", "node", node, f"{TEST_NODE_LABEL}={label}")
    wait_for(lambda: status(cluster, namespace, name).get("phase") == "Validating", timeout=90,
             what=f"{name} to run on {node}", interval=1)
    return pod


class PodConditions:
    """Watches one pod and remembers the reason of every condition it ever carried."""

    def __init__(self, cluster, namespace: str, name: str) -> None:
        from kubernetes import client, watch

        self.conditions: dict[str, str] = {}
        self._watch = watch.Watch()
        core = client.CoreV1Api(cluster.api_client())

        def run():
            try:
                for event in self._watch.stream(core.list_namespaced_pod, namespace,
                                                field_selector=f"metadata.name={name}", timeout_seconds=300):
                    for cond in event["object"].status.conditions or []:
                        self.conditions[cond.type] = cond.reason
            except Exception:  # noqa: BLE001 - the stream ends when stopped or the cluster goes
                pass
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        time.sleep(0.5)  # the watch is open before the node goes

    def stop(self) -> None:
        self._watch.stop()


def retry(cluster, *args, **kwargs):
    """kubectl right after a restart: the API may still refuse for a moment."""
    return wait_for(lambda: cluster.kubectl(*args, check=False, **kwargs).returncode == 0, timeout=60,
                    what=f"kubectl {' '.join(args[:3])} to succeed")


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_watches_recover_after_a_control_plane_restart(own_cluster, own_namespace, operator, component):
    """Given a job running (simulated kubelet status) when kube-apiserver or etcd is SIGKILLed and
    started again under two operator replicas, then a replica leads again, sees the pod's exit that is written as soon
    as the API answers again (while its watches are still broken), and a job created right after
    the restart goes through to Succeeded on kwok."""
    c, ns = own_cluster, own_namespace
    add_kwok_node(c, f"run-{ns}-{component}")
    pod = training_on(c, ns, "during", f"run-{ns}-{component}")

    c.restart_component(component)
    if component == "etcd":
        wait_for(lambda: c.kubectl("get", "--raw", "/readyz", check=False).stdout.strip() == "ok",
                 timeout=60, what="kube-apiserver to be ready against the new etcd")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    retry(c, "patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status", "--type=strategic",
          "-p", json.dumps({"status": {"phase": "Succeeded", "containerStatuses": [{
              "name": "trainer", "image": "finetune-trainer:test", "imageID": "", "ready": False,
              "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                                          "startedAt": now, "finishedAt": now}}}]}}))
    retry(c, "apply", "-n", ns, "-f", "-", input=json.dumps(ftj("after")))

    for name in ("during", "after"):
        wait_for(lambda: status(c, ns, name).get("phase") == "Succeeded", timeout=120,
                 what=f"{name} to be Succeeded after the {component} restart", interval=1)
    # Every replica runs (one that lost the Lease while the API was away exited and came back),
    # one leads, and no job got a second trainer Job.
    operator.leader()
    assert operator.all_running()
    print(f"replicas restarted after exiting during the {component} restart: {operator.exits_restarted}")
    assert [len(trainer_jobs(c, ns, n)) for n in ("during", "after")] == [1, 1]


def test_deleted_node_replaces_the_pod_without_counting_a_failure(own_cluster, own_namespace, operator):
    """Given a trainer pod running on a kwok node (kept running: its completion is delayed by
    kwok's stage annotation), when the node is deleted, then kube-controller-manager's pod GC
    fails the orphaned pod with a DisruptionTarget condition, the Job's podFailurePolicy ignores
    it (status.failed stays 0), a replacement pod is created, the FineTuneJob counts no restart
    and reaches Succeeded on another node."""
    c, ns = own_cluster, own_namespace
    doomed, spare, label = f"doomed-{ns}", f"spare-{ns}", f"{ns}-evicted"
    add_kwok_node(c, doomed)
    add_kwok_node(c, spare)
    first = training_on(c, ns, "evicted", doomed)
    assert trainer_pods(c, ns, "evicted")[0]["spec"]["nodeName"] == doomed

    seen = PodConditions(c, ns, first["metadata"]["name"])
    c.kubectl("delete", "node", doomed)
    started = time.monotonic()
    c.kubectl("label", "node", spare, f"{TEST_NODE_LABEL}={label}")
    replacement = wait_for(lambda: [p for p in trainer_pods(c, ns, "evicted")
                                    if p["metadata"]["uid"] != first["metadata"]["uid"]],
                           timeout=150, what="pod GC to replace the orphaned pod", interval=1)[0]
    print(f"pod replaced {time.monotonic() - started:.0f}s after its node was deleted")
    events = get_json(c, "events", "-n", ns, "--field-selector", f"involvedObject.name={first['metadata']['name']}")
    s = wait_for(lambda: (s := status(c, ns, "evicted")).get("phase") == "Succeeded" and s, timeout=90,
                 what="the job to succeed on the other node", interval=1)

    seen.stop()
    print(f"conditions the evicted pod carried: {seen.conditions}")
    assert seen.conditions.get("DisruptionTarget") == "DeletionByPodGC", seen.conditions
    (job,) = trainer_jobs(c, ns, "evicted")
    assert not job["status"].get("failed"), job["status"]
    assert [p["spec"].get("nodeName") for p in trainer_pods(c, ns, "evicted")] == [spare]
    assert replacement["metadata"]["uid"] != first["metadata"]["uid"]
    assert s.get("restarts", 0) == 0, s
    reasons = {e.get("reason") for e in events["items"]}
    print(f"events on the evicted pod: {sorted(r for r in reasons if r)}")
