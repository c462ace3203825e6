"""The operator SIGKILLed at seeded random moments while several FineTuneJobs go through their lives.

Two replicas run with leader election, as the chart runs them: each kill hits the replica that
leads at that moment, the standby takes over once the Lease expires, and the killed one comes
back as the standby (#14: the reliability suite passes with two replicas running).

Eight FineTuneJobs on the kwok GPU nodes (kwok completes their pods with exit 0); one of them
is pinned to no node and gets the trainer's permanent exit code written onto its pod, the
simulation the lifecycle tests use. The operator is killed and started again at least 30
times while they are created, run and finish, and once more while they are deleted.
"""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
from kubernetes import client

from tests.fixtures.cluster import get_json, wait_for
from tests.fixtures.operator import ReplicatedOperator
from tests.cluster.test_operator_lifecycle import NOWHERE, apply, fail_pod, ftj, status, trainer_pods

pytestmark = [pytest.mark.reliability, pytest.mark.cluster, pytest.mark.slow]

SEED = 1729
KILLS = 32
JOBS = [f"chaos-{i}" for i in range(8)]
PLANNED_FAILURE = "chaos-3"
CHILD_KINDS = ("jobs", "configmaps", "serviceaccounts", "roles", "rolebindings", "services")


def fail_with_bad_data(cluster, namespace: str, pod: dict) -> None:
    """The trainer's permanent exit on bad data, written onto the pending pod (a simulation)."""
    fail_pod(cluster, namespace, pod, 42, json.dumps({
        "reason": "DataValidationFailed", "message": "1 of 48 records is invalid",
        "firstErrors": ['line 7: field "output" is missing (format: instruction)']}))


class JobWatcher:
    """Polls the namespace's trainer Jobs and remembers every uid ever seen per FineTuneJob."""

    def __init__(self, cluster, namespace: str) -> None:
        self.batch = client.BatchV1Api(cluster.api_client())
        self.namespace = namespace
        self.uids: dict[str, set[str]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                # Trainer Jobs only: a succeeded job's comparison Job carries the same job label.
                for job in self.batch.list_namespaced_job(
                        self.namespace, label_selector="app.kubernetes.io/component=trainer").items:
                    owner = (job.metadata.labels or {}).get("finetune.dev/finetunejob", "?")
                    self.uids.setdefault(owner, set()).add(job.metadata.uid)
            except Exception:  # noqa: BLE001 - keep watching
                pass
            self.stop.wait(0.3)

    def __enter__(self) -> "JobWatcher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


@pytest.fixture
def operator(cluster, crds, namespace, tmp_path):
    """Two leader-electing replicas (named `operator` so a failing test gets their logs)."""
    replicas = ReplicatedOperator(cluster, namespace, tmp_path, [])
    replicas.start()
    yield replicas
    replicas.stop()


def test_operator_killed_30_times_across_eight_jobs_ends_every_job_right(cluster, namespace, operator):
    """Given eight FineTuneJobs created one by one while the leading replica is SIGKILLed and
    started again at 32 seeded random moments, then every job reaches its right terminal phase (seven
    Succeeded, the planned one Failed with DataValidationFailed), each got exactly one trainer Job
    over the whole run, every child is owned by an existing FineTuneJob, and deleting them all
    (with one more kill during deletion) leaves no FineTuneJob stuck on a finalizer."""
    rng = random.Random(SEED)
    to_create = list(JOBS)
    failed_pod = None
    kills = 0
    started = time.monotonic()
    with JobWatcher(cluster, namespace) as watcher:
        while kills < KILLS:
            if to_create and rng.random() < 0.6:
                name = to_create.pop(0)
                extra = {"resources": {"nodeSelector": NOWHERE}} if name == PLANNED_FAILURE else {}
                apply(cluster, namespace, ftj(name, **extra))
            if failed_pod is None and PLANNED_FAILURE not in to_create:
                pods = trainer_pods(cluster, namespace, PLANNED_FAILURE)
                if pods:
                    failed_pod = pods[0]
                    fail_with_bad_data(cluster, namespace, failed_pod)
            time.sleep(rng.uniform(0.0, 1.5))
            operator.kill()
            kills += 1
            operator.start()
        assert not to_create, "the seed should create every job during the kills"
        if failed_pod is None:  # its pod came after the last kill: fail it now
            failed_pod = wait_for(lambda: trainer_pods(cluster, namespace, PLANNED_FAILURE), timeout=60,
                                  what="the planned failure's pod")[0]
            fail_with_bad_data(cluster, namespace, failed_pod)

        phases = wait_for(lambda: (p := {n: status(cluster, namespace, n).get("phase") for n in JOBS})
                          and all(v in ("Succeeded", "Failed") for v in p.values()) and p,
                          timeout=180, what="every FineTuneJob to finish", interval=1)
        time.sleep(2)  # let the watcher see the last state
    elapsed = time.monotonic() - started

    jobs_created = sum(len(uids) for uids in watcher.uids.values())
    print(f"operator kills: {kills}, operator starts: {operator.starts}, FineTuneJobs: {len(JOBS)}, "
          f"trainer Jobs created: {jobs_created}, seconds: {elapsed:.0f}, phases: {phases}")
    print(f"replicas that exited on their own and were started again: {operator.exits_restarted}")
    assert kills >= 30 and operator.starts == kills + len(operator.replicas) + operator.exits_restarted
    assert phases == {n: ("Failed" if n == PLANNED_FAILURE else "Succeeded") for n in JOBS}
    failed = next(c for c in status(cluster, namespace, PLANNED_FAILURE)["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DataValidationFailed" and "line 7" in failed["message"]
    assert {n: len(u) for n, u in watcher.uids.items()} == {n: 1 for n in JOBS}
    assert jobs_created == len(JOBS)

    owners = {o["metadata"]["uid"] for o in get_json(cluster, "ftj", "-n", namespace)["items"]}
    children = 0
    for kind in CHILD_KINDS:
        for child in get_json(cluster, kind, "-n", namespace, "-l",
                              "app.kubernetes.io/managed-by=finetune-operator")["items"]:
            refs = [r["uid"] for r in child["metadata"].get("ownerReferences") or []]
            assert refs and set(refs) <= owners, f"orphaned {kind} {child['metadata']['name']}: {refs}"
            children += 1
    assert children >= len(JOBS) * 5  # Job, ConfigMap, ServiceAccount, Role, RoleBinding each
    print(f"children checked for owners: {children}")

    cluster.kubectl("delete", "ftj", "--all", "-n", namespace, "--wait=false")
    time.sleep(rng.uniform(0.0, 1.0))
    operator.restart()
    wait_for(lambda: not get_json(cluster, "ftj", "-n", namespace)["items"], timeout=90,
             what="every FineTuneJob to be deleted (no stuck finalizer)")
    wait_for(lambda: not get_json(cluster, "jobs", "-n", namespace)["items"], timeout=90,
             what="the trainer Jobs to be garbage-collected")
    assert operator.all_running()
