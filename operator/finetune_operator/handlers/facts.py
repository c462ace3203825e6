"""What admission needs to know about the cluster: which referenced Secrets (and their keys),
claims and PriorityClass exist, and each node's allocatable GPUs. Claims come from the watch
cache when it has them (cache.claim_exists); Secrets are always read (the operator does not
watch Secrets: it may only get the ones jobs name)."""

from __future__ import annotations

import json
import threading
import time

from kubernetes import client

from finetune_api.models import FineTuneJob

from finetune_operator import admission, cache, kube
from finetune_operator.builders.placement import GPU_RESOURCE

# Admission needs only each node's allocatable GPUs. Listing every node for every new
# FineTuneJob, and building a typed model of each, was most of the operator's CPU when many
# jobs arrive at once (200 nodes: about a third of its samples), so the list is read raw and
# shared for a few seconds.
NODE_GPUS_TTL_SECONDS = 5.0
_node_gpus_cache: tuple[float, list[int]] | None = None
_node_gpus_guard = threading.Lock()


def gather(job: FineTuneJob) -> admission.ClusterFacts:
    ns = job.metadata.namespace
    facts = admission.ClusterFacts()
    # Plain JSON reads (kube.request): the typed client's models cost more CPU than the request.
    for secret_name in admission.secret_names(job):
        secret = kube.call(kube.request, "GET", f"/api/v1/namespaces/{ns}/secrets/{secret_name}", absent=True)
        if secret is not None:
            facts.secrets[secret_name] = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
    for _, claim in admission.claims_to_check(job):
        if cache.claim_exists(ns, claim, lambda c=claim: kube.call(
                kube.request, "GET", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{c}", absent=True) is not None):
            facts.claims.add(claim)
    priority_class = job.spec.resources.priority_class_name
    if priority_class:
        found = kube.exists(client.SchedulingV1Api(kube.api()).read_priority_class, priority_class)
        if found is not None:  # None: not allowed to look, so do not judge
            facts.priority_classes = {priority_class} if found else set()
    if job.spec.resources.gpus_per_node > 0:
        gpus = kube.call(node_gpus, forbidden=True)
        if gpus is not None:
            facts.node_gpus = gpus
    return facts


def node_gpus() -> list[int]:
    global _node_gpus_cache
    with _node_gpus_guard:
        if _node_gpus_cache and time.monotonic() - _node_gpus_cache[0] < NODE_GPUS_TTL_SECONDS:
            return _node_gpus_cache[1]
        raw = kube.core().list_node(_preload_content=False)
        nodes = json.loads(raw.data)["items"]
        gpus = [int(((n.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE, "0")) for n in nodes]
        _node_gpus_cache = (time.monotonic(), gpus)
        return gpus
