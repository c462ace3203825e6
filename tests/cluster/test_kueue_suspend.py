"""#14 item 8: suspending a job that Kueue queues deleted its trainer Job, and with it the
Workload, so resuming put the job at the back of the queue. It now deactivates the Workload
(spec.active false), the way Kueue expects, and activates it again on resume.

Kueue's CRD is the real one (the pinned Go module, hack/fetch-kueue-crd.sh), but Kueue's
controller does not run here: the test creates the Workload as Kueue would (owned by the Job,
labelled with its uid), a stand-in said so here.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.fixtures.cluster import REPO_ROOT, get_json, wait_for
from tests.cluster.test_operator_lifecycle import NOWHERE, apply, events, ftj, trainer_jobs, wait_phase

WORKLOADS = "workloads.kueue.x-k8s.io"


@pytest.fixture
def kueue_crd(cluster):
    path = subprocess.run(["bash", str(REPO_ROOT / "hack" / "fetch-kueue-crd.sh")], check=True,
                          capture_output=True, text=True, timeout=300).stdout.strip()
    cluster.kubectl("apply", "--server-side", "-f", path)
    cluster.wait_established(WORKLOADS)
    yield
    cluster.kubectl("delete", "crd", WORKLOADS, "--wait=true", "--timeout=60s")


def make_workload(cluster, namespace: str, job: dict) -> str:
    """What Kueue's job controller creates for a queued Job (only the fields the operator reads)."""
    name = f"job-{job['metadata']['name']}"
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
        "metadata": {"name": name, "labels": {"kueue.x-k8s.io/job-uid": job["metadata"]["uid"]},
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                                          "uid": job["metadata"]["uid"], "controller": True}]},
        "spec": {"queueName": "team-a", "podSets": [{"name": "main", "count": 1, "template": job["spec"]["template"]}]}}))
    return name


def active(cluster, namespace: str, name: str) -> bool:
    return get_json(cluster, WORKLOADS, name, "-n", namespace)["spec"].get("active", True)


def test_suspending_a_queued_job_deactivates_its_workload_and_keeps_the_job(cluster, namespace, operator, kueue_crd):
    queued = {"resources": {"queueName": "team-a", "nodeSelector": NOWHERE}}
    for name in ("kept", "nokueue"):
        apply(cluster, namespace, ftj(name, **queued))
    for name in ("kept", "nokueue"):
        wait_phase(cluster, namespace, name, "Pending", reason="Queued")
    (job,) = trainer_jobs(cluster, namespace, "kept")
    workload = make_workload(cluster, namespace, job)
    assert active(cluster, namespace, workload)

    for name in ("kept", "nokueue"):
        cluster.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(lambda: not active(cluster, namespace, workload), timeout=60, what="the Workload to be deactivated")
    wait_phase(cluster, namespace, "kept", "Suspended")
    # Kept: the same Job (Kueue suspends it) and the same Workload, so the same place in the queue.
    assert [j["metadata"]["uid"] for j in trainer_jobs(cluster, namespace, "kept")] == [job["metadata"]["uid"]]
    assert get_json(cluster, WORKLOADS, workload, "-n", namespace)["metadata"]["uid"]
    suspending = [e for e in events(cluster, namespace, "kept") if e["reason"] == "Suspending"]
    assert suspending and "deactivated Kueue Workload" in suspending[0]["message"]
    # Without a Workload (no Kueue to find), the Job is deleted as before; checkpoints stay.
    wait_for(lambda: not trainer_jobs(cluster, namespace, "nokueue"), timeout=60,
             what="the Job of the job with no Workload to be deleted")
    wait_phase(cluster, namespace, "nokueue", "Suspended")

    cluster.kubectl("patch", "ftj", "kept", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: active(cluster, namespace, workload), timeout=60, what="the Workload to be active again")
    wait_phase(cluster, namespace, "kept", "Pending", reason="Queued")
    assert [j["metadata"]["uid"] for j in trainer_jobs(cluster, namespace, "kept")] == [job["metadata"]["uid"]]
