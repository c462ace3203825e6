"""Suspending a job that Kueue queues, without losing its place in the queue.

Kueue owns a queued Job's `spec.suspend` (it unsuspends the Job when it admits the Job's
Workload), so the operator cannot suspend such a Job itself. Deleting the Job, as the operator
once did, deleted its Workload too: resuming created a new one at the back of the queue.

Kueue's own way is the Workload's `spec.active`: false evicts it (Kueue suspends the Job, its
pods get SIGTERM and checkpoint) and keeps it; true queues it again, ordered by the
Workload's creation time as before. The Workload is found by Kueue's label
`kueue.x-k8s.io/job-uid` (the Job's uid).
"""

from __future__ import annotations

from typing import Optional

from finetune_operator import kube

GROUP = "kueue.x-k8s.io"
# Newest first: Kueue 0.17 stores v1beta2 and still serves v1beta1; older releases serve v1beta1 only.
VERSIONS = ("v1beta2", "v1beta1")
PLURAL = "workloads"
JOB_UID_LABEL = f"{GROUP}/job-uid"


def workload_of(job: dict) -> Optional[tuple[str, dict]]:
    """The (version, Workload) Kueue made for this Job, or None: no Workload yet, or no Kueue
    (its API is not served, or the operator may not read it)."""
    ns, uid = job["metadata"]["namespace"], job["metadata"]["uid"]
    for version in VERSIONS:
        found = kube.call(kube.custom().list_namespaced_custom_object, GROUP, version, ns, PLURAL,
                          label_selector=f"{JOB_UID_LABEL}={uid}", absent=True, forbidden=True)
        if found is None:
            continue  # this version is not served here (or not ours to read)
        items = found.get("items") or []
        return (version, items[0]) if items else None
    return None


def is_active(workload: dict) -> bool:
    return (workload.get("spec") or {}).get("active", True) is not False


def set_active(version: str, workload: dict, active: bool) -> None:
    meta = workload["metadata"]
    kube.custom().patch_namespaced_custom_object(
        GROUP, version, meta["namespace"], PLURAL, meta["name"], {"spec": {"active": active}},
        _content_type=kube.MERGE_PATCH)
