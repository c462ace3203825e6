"""Two operator replicas with --leader-elect against the real API server: one leads, the other
stands by without running kopf, and takes over when the leader is SIGKILLed (within the lease
duration + 5 s) or releases the Lease on SIGTERM (within a few retry periods)."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.fixtures.cluster import get_json, wait_for
from tests.fixtures.operator import OperatorProcess

LEASE_DURATION = 15.0


def ftj(name: str) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"source": "org/tiny"},
                     "dataset": {"source": f"pvc://{name}-workspace/data/train.jsonl"},
                     "resources": {"gpusPerNode": 1}, "training": {"precision": "fp32"}}}


def identity(proc: OperatorProcess) -> str:
    def found():
        m = re.search(r"leader election: (?:acquired Lease \S+ as|standing by as) (\S+?);?\s", proc.log.read_text())
        return m and m.group(1)
    return wait_for(found, timeout=60, what=f"{proc.log.name} to report its leader-election identity")


def holder(cluster, namespace: str) -> str:
    lease = get_json(cluster, "lease", "finetune-operator", "-n", namespace)
    return lease["spec"].get("holderIdentity") or ""


def trainer_jobs(cluster, namespace: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in get_json(cluster, "jobs", "-n", namespace, "-l", "app.kubernetes.io/component=trainer")["items"]:
        owner = job["metadata"]["labels"].get("finetune.dev/finetunejob", "")
        counts[owner] = counts.get(owner, 0) + 1
    return counts


@pytest.fixture
def replicas(cluster, crds, namespace, tmp_path):
    args = ["--leader-elect", "--leader-election-namespace", namespace]
    procs = [OperatorProcess(cluster, namespace, tmp_path / f"operator-{i}.log", args) for i in range(3)]
    yield procs
    for p in procs:
        p.stop()


def test_one_replica_leads_the_standby_takes_over_and_no_job_is_duplicated(cluster, namespace, replicas):
    a, b, c = replicas
    a.start()
    id_a = identity(a)
    wait_for(lambda: holder(cluster, namespace) == id_a, timeout=30, what="the first replica to hold the Lease")
    b.start()  # its /healthz answers while it stands by
    id_b = identity(b)
    assert id_b != id_a and "standing by" in b.log.read_text()

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj("first")))
    wait_for(lambda: trainer_jobs(cluster, namespace).get("first"), timeout=90, what="the leader to create a Job")
    # The standby never ran kopf: no handler ran there, and it exports leader 0.
    assert "Handler" not in b.log.read_text() and "finetune-operator started" not in b.log.read_text()
    assert re.search(r"^finetune_operator_leader 0\.0$", b.metrics(), re.M)
    assert re.search(r"^finetune_operator_leader 1\.0$", a.metrics(), re.M)

    # SIGKILL: no release; the standby waits out the lease duration it observed, then leads.
    a.kill()
    killed = time.monotonic()
    wait_for(lambda: holder(cluster, namespace) == id_b, timeout=LEASE_DURATION + 5,
             what="the standby to take the Lease within the lease duration + 5 s")
    took_over = time.monotonic() - killed
    lease = get_json(cluster, "lease", "finetune-operator", "-n", namespace)["spec"]
    assert lease["leaseTransitions"] >= 1

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj("second")))
    wait_for(lambda: trainer_jobs(cluster, namespace).get("second"), timeout=90, what="the new leader to create a Job")
    assert trainer_jobs(cluster, namespace) == {"first": 1, "second": 1}

    # SIGTERM: the leader releases the Lease, so the next standby leads in a few retry periods.
    c.start()
    id_c = identity(c)
    b.stop()
    released = time.monotonic()
    wait_for(lambda: holder(cluster, namespace) == id_c, timeout=10,
             what="the last standby to take the released Lease")
    assert time.monotonic() - released < LEASE_DURATION, "a released Lease is taken at once, not after expiry"
    assert "released Lease" in b.log.read_text()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ftj("third")))
    wait_for(lambda: trainer_jobs(cluster, namespace).get("third"), timeout=90, what="the third leader to create a Job")
    assert trainer_jobs(cluster, namespace) == {"first": 1, "second": 1, "third": 1}
    print(f"takeover after SIGKILL: {took_over:.1f} s")

