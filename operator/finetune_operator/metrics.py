"""The operator's Prometheus metrics, on their own registry, served on --metrics-port
(by `review_http`, which serves the review pages on the same port).

`METRIC_NAMES` is the one list of what the operator exports (dashboards and alert tests
import it).
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "finetune_operator"

JOBS = f"{PREFIX}_jobs"
PHASE_TRANSITIONS = f"{PREFIX}_phase_transitions_total"
RECONCILE_DURATION = f"{PREFIX}_reconcile_duration_seconds"
RECONCILE_ERRORS = f"{PREFIX}_reconcile_errors_total"
TIME_TO_TRAINING_START = f"{PREFIX}_time_to_training_start_seconds"
JOB_DURATION = f"{PREFIX}_job_duration_seconds"
# In seconds, Prometheus's base unit (promtool check metrics flags "hours"); the dashboard divides.
GPU_SECONDS = f"{PREFIX}_gpu_seconds_total"
# 1 while this replica holds the leader Lease (or runs without leader election), else 0.
LEADER = f"{PREFIX}_leader"
# Always 1, with the operator's version and Python's as labels.
BUILD_INFO = f"{PREFIX}_build_info"
# Requests the handlers make to the API server, by HTTP method and status code ("error" when
# no answer came); kopf's own watches and patches are not included.
API_REQUESTS = f"{PREFIX}_api_requests_total"
# Reconciliations waiting for another one of the same object to finish (its lock).
RECONCILE_QUEUE_DEPTH = f"{PREFIX}_reconcile_queue_depth"
# Status refreshes skipped because one of the same job was already waiting (it covers them).
REFRESHES_COALESCED = f"{PREFIX}_refreshes_coalesced_total"
# Status writes refused because the object changed since it was read (optimistic concurrency);
# each is followed by a fresh read and a second try.
STATUS_CONFLICTS = f"{PREFIX}_status_conflicts_total"

METRIC_NAMES: tuple[str, ...] = (
    JOBS, PHASE_TRANSITIONS, RECONCILE_DURATION, RECONCILE_ERRORS,
    TIME_TO_TRAINING_START, JOB_DURATION, GPU_SECONDS, LEADER, BUILD_INFO, API_REQUESTS,
    RECONCILE_QUEUE_DEPTH, REFRESHES_COALESCED, STATUS_CONFLICTS,
)

registry = CollectorRegistry()


def _strip_total(name: str) -> str:
    # prometheus_client appends _total to counters itself.
    return name[: -len("_total")] if name.endswith("_total") else name


jobs = Gauge(JOBS, "FineTuneJobs known to this operator, by phase.", ["phase"], registry=registry)
phase_transitions = Counter(_strip_total(PHASE_TRANSITIONS), "FineTuneJob phase transitions.",
                            ["from", "to"], registry=registry)
reconcile_duration = Histogram(RECONCILE_DURATION, "Time spent in one reconciliation.",
                               registry=registry)
reconcile_errors = Counter(_strip_total(RECONCILE_ERRORS), "Reconciliations that raised.",
                           registry=registry)
time_to_training_start = Histogram(
    TIME_TO_TRAINING_START, "From FineTuneJob creation to its first trainer pod running.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf")), registry=registry)
job_duration = Histogram(
    JOB_DURATION, "From FineTuneJob creation to Succeeded or Failed.",
    buckets=(30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, float("inf")),
    registry=registry)
gpu_seconds = Counter(_strip_total(GPU_SECONDS), "GPU seconds consumed by trainer pods.",
                    registry=registry)
leader = Gauge(LEADER, "1 while this replica leads (holds the Lease, or runs without leader election).",
               registry=registry)
api_requests = Counter(_strip_total(API_REQUESTS), "Requests the operator's handlers made to the API "
                       "server, by method and status code.", ["method", "code"], registry=registry)
reconcile_queue_depth = Gauge(RECONCILE_QUEUE_DEPTH, "Reconciliations waiting for one of the same "
                              "object to finish.", registry=registry)
refreshes_coalesced = Counter(_strip_total(REFRESHES_COALESCED), "Status refreshes skipped because one "
                              "of the same job was already waiting.", registry=registry)
status_conflicts = Counter(_strip_total(STATUS_CONFLICTS), "Status writes refused because the object "
                           "changed since it was read (then read again and retried).", registry=registry)
build_info = Gauge(BUILD_INFO, "Always 1; the operator's version and Python's are labels.",
                   ["version", "python"], registry=registry)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("finetune-operator")
    except PackageNotFoundError:
        return "unknown"


build_info.labels(version=_version(), python=platform.python_version()).set(1)


def set_job_counts(counts: dict[str, int], phases: tuple[str, ...]) -> None:
    for phase in phases:
        jobs.labels(phase=phase).set(counts.get(phase, 0))
