"""What a FineTuneJob's transitions leave behind besides its status: Events, log lines and the
operator's metrics (the jobs-per-phase gauge forgets a job when it is deleted)."""

from __future__ import annotations

import datetime as dt
import logging
import threading

import kopf

from finetune_api.models import FineTuneJob

from finetune_operator import metrics
from finetune_operator.status import PHASES, Observation, Phase, parse_time

log = logging.getLogger("finetune_operator.finetunejob")

_phases: dict[tuple[str, str], str] = {}  # for the finetune_operator_jobs gauge
# Jobs per phase, kept as phases change: counting `_phases` afresh on every refresh was O(N)
# per refresh, under a lock every refresh thread waits for (a tenth of the operator's samples
# at N=1000, #14).
_counts: dict[str, int] = {phase: 0 for phase in PHASES}
_phases_guard = threading.Lock()
# GPU hours already added to finetune_operator_gpu_seconds_total, per job: status.gpuHours is
# written at most once a minute while only it moves, so it alone would count the same hours twice.
_gpu_counted: dict[tuple[str, str], tuple[str | None, float]] = {}


def transition(body: dict, old: str | None, new: str, reason: str, message: str,
               notes: list[tuple[str, str]] | None = None) -> None:
    """One Event per phase transition; `notes`, (reason, message) of what the operator did on
    the way (created the trainer Job, the comparison Job), go into it rather than into Events
    of their own: every Event is a request per job, and N jobs arrive at once. Without a
    transition, each note is an Event."""
    if old == new:
        for note_reason, note in notes or []:
            kopf.event(body, type="Normal", reason=note_reason, message=note[:1000])
        return
    metrics.phase_transitions.labels(**{"from": old or "", "to": new}).inc()
    done = "".join(f" ({r}: {m})" for r, m in notes or [])
    text = f"{old or 'New'} -> {new}: {reason}: {message}{done}"[:1000]
    if new == Phase.FAILED.value:
        kopf.warn(body, reason=reason, message=text)
    else:
        kopf.event(body, type="Normal", reason=new, message=text)
    log.info("%s/%s %s", body["metadata"].get("namespace"), body["metadata"].get("name"), text)


def _set_phase(key: tuple[str, str], phase: str | None) -> None:
    """Record `key`'s phase (None: the job is gone) and move the gauge of the two phases
    concerned. Called with `_phases_guard` held."""
    old = _phases.pop(key, None) if phase is None else _phases.get(key)
    if old == phase:
        return
    if phase is not None:
        _phases[key] = phase
    moved = {}
    for p, delta in ((old, -1), (phase, 1)):
        if p is not None:
            _counts[p] = _counts.get(p, 0) + delta
            moved[p] = _counts[p]
    metrics.set_job_counts(moved, tuple(moved))


def known() -> set[tuple[str, str]]:
    with _phases_guard:
        return set(_phases) | set(_gpu_counted)


def forget(namespace: str, name: str) -> None:
    with _phases_guard:
        _set_phase((namespace, name), None)
        _gpu_counted.pop((namespace, name), None)


def observe(job: FineTuneJob, obs: Observation, obj: dict, now: dt.datetime) -> None:
    key = (job.metadata.namespace, job.metadata.name)
    with _phases_guard:
        _set_phase(key, obs.phase.value)
        # Per uid: a job deleted and created again under its name starts from nothing, also
        # before the resync loop has forgotten the old one.
        uid, before = _gpu_counted.get(key, (job.metadata.uid, 0.0))
        counted = max(job.status.gpu_hours or 0.0, before if uid == job.metadata.uid else 0.0)
        _gpu_counted[key] = (job.metadata.uid, max(counted, obs.gpu_hours))
    if obs.gpu_hours > counted:
        metrics.gpu_seconds.inc((obs.gpu_hours - counted) * 3600)
    created = parse_time(obj["metadata"].get("creationTimestamp"))
    old = job.status.phase
    if created and obs.phase.running and old in (None, Phase.PENDING.value) and obs.restarts == 0 \
            and obs.reason not in ("Resumed", "Retrying") and obs.first_running_at:
        metrics.time_to_training_start.observe(
            max((parse_time(obs.first_running_at) - created).total_seconds(), 0))
    if created and obs.phase.terminal and old != obs.phase.value:
        metrics.job_duration.observe(max((now - created).total_seconds(), 0))


metrics.set_job_counts({}, PHASES)  # every phase's series from the start, at 0
