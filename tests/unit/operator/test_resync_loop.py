"""#14: one resync loop for every job instead of a kopf timer per job. A job whose refresh is
queued or running is not queued again (a slow API cannot pile up refreshes), only jobs that
can still change with time alone are refreshed, and the refreshes run in the context they were
given (kopf's event posting needs it)."""

from __future__ import annotations

import contextvars
import threading

from finetune_operator import cache, resync
from finetune_operator.handlers import finetunejob

VAR = contextvars.ContextVar("handler_context")


def test_a_job_is_queued_once_while_its_refresh_is_pending():
    release, ran, seen = threading.Event(), [], []

    def refresh(ns, name):
        seen.append(VAR.get(None))
        release.wait(5)
        ran.append((ns, name))

    loop = resync.Resync(3600, lambda: [("ml", "a"), ("ml", "b")], refresh, workers=1)
    VAR.set("from-a-handler")
    loop.start(contextvars.copy_context())
    try:
        assert loop.tick() == 2
        assert loop.tick() == 0  # both still pending: nothing queued twice
        release.set()
        loop._pool.shutdown(wait=True)
        assert sorted(ran) == [("ml", "a"), ("ml", "b")] and seen == ["from-a-handler"] * 2
    finally:
        loop.stop()


def test_only_admitted_unfinished_jobs_or_those_with_a_ttl_are_due():
    admitted = [{"type": "Admitted", "status": "True"}]

    def obj(name, phase, conditions=admitted, **spec):
        return {"metadata": {"namespace": "ml", "name": name}, "spec": spec,
                "status": {"phase": phase, "conditions": conditions}}

    class Index(dict):
        pass

    index = Index({("ml", n): [o] for n, o in [
        ("training", obj("training", "Training")),
        ("done", obj("done", "Succeeded")),
        ("done-ttl", obj("done-ttl", "Succeeded", ttlSecondsAfterFinished=60)),
        ("new", obj("new", "Pending", conditions=[])),
        ("failed", obj("failed", "Failed")),
    ]})
    cache.reset()
    cache.bind(finetunejobs=index)
    finetunejob._refreshed_at.clear()
    try:
        assert sorted(n for _, n in finetunejob.due_for_resync()) == ["done-ttl", "training"]
    finally:
        cache.reset()


def test_the_pass_refreshes_a_job_only_when_time_alone_may_have_moved_it(monkeypatch):
    """A job refreshed a moment ago is not refreshed again on the next pass: a running one
    waits for its GPU hours to be worth writing (once a minute), a finished one for its TTL.
    Refreshing every job on every pass made the operator's CPU grow as N² (#14)."""
    admitted = [{"type": "Admitted", "status": "True"}]
    now = finetunejob._now()

    def stamp(seconds_ago):
        return (now - __import__("datetime").timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def obj(name, phase, **extra):
        status = {"phase": phase, "conditions": admitted, **extra.pop("status", {})}
        return {"metadata": {"namespace": "ml", "name": name}, "spec": extra, "status": status}

    jobs = {
        "fresh-training": (obj("fresh-training", "Training"), 5),
        "stale-training": (obj("stale-training", "Training"), finetunejob.GPU_HOURS_WRITE_SECONDS + 1),
        "never-refreshed": (obj("never-refreshed", "Pending"), None),
        "deploying": (obj("deploying", "Deploying"), 1),
        "approval": (obj("approval", "AwaitingApproval"), 1),
        "ttl-running": (obj("ttl-running", "Succeeded", ttlSecondsAfterFinished=3600,
                            status={"completionTime": stamp(10)}), 5),
        "ttl-out": (obj("ttl-out", "Succeeded", ttlSecondsAfterFinished=60,
                        status={"completionTime": stamp(120)}), 5),
    }
    index = {("ml", n): [o] for n, (o, _) in jobs.items()}
    cache.reset()
    cache.bind(finetunejobs=index)
    mono = finetunejob.time.monotonic()
    finetunejob._refreshed_at.clear()
    finetunejob._refreshed_at.update({("ml", n): mono - ago for n, (_, ago) in jobs.items() if ago is not None})
    try:
        assert sorted(n for _, n in finetunejob.due_for_resync()) == [
            "approval", "deploying", "never-refreshed", "stale-training", "ttl-out"]
    finally:
        cache.reset()
        finetunejob._refreshed_at.clear()


def test_a_write_the_operator_did_not_make_refreshes_the_job_and_its_own_do_not():
    """The trainer's progress report moves Validating -> Training at once, not at the next
    pass; the watch event of the operator's own status patch is not news."""
    admitted = [{"type": "Admitted", "status": "True"}]

    def body(rv, phase="Validating", name="a", **meta):
        return {"kind": "FineTuneJob", "metadata": {"namespace": "ml", "name": name, "uid": "u1",
                                                    "resourceVersion": rv, **meta},
                "spec": {}, "status": {"phase": phase, "conditions": admitted}}

    cache.reset()
    finetunejob._refreshed_at.clear()
    refreshed = []
    try:
        finetunejob.on_finetunejob_event(body("5"), lambda *k: refreshed.append(k))
        assert refreshed == []  # never refreshed by this operator: its spec handler's
        finetunejob._refreshed_at[("ml", "a")] = finetunejob.time.monotonic()
        cache.remember(body("7"))  # the operator's own status patch answered version 7
        finetunejob.on_finetunejob_event(body("7"), lambda *k: refreshed.append(k))
        assert refreshed == []
        finetunejob.on_finetunejob_event(body("8"), lambda *k: refreshed.append(k))  # the trainer's
        assert refreshed == [("ml", "a")]
        finetunejob.on_finetunejob_event(body("9", deletionTimestamp="2026-12-02T00:00:00Z"),
                                         lambda *k: refreshed.append(k))
        finetunejob.on_finetunejob_event(body("10", phase="Succeeded"), lambda *k: refreshed.append(k))
        assert refreshed == [("ml", "a")]  # deleting, or finished without a TTL: nothing to follow
    finally:
        cache.reset()
        finetunejob._refreshed_at.clear()


def test_a_burst_of_events_is_one_refresh_and_an_event_during_it_brings_another():
    ran, started, release = [], threading.Event(), threading.Event()

    def refresh(ns, name):
        ran.append(name)
        if len(ran) == 1:
            started.set()
            release.wait(5)

    loop = resync.Resync(3600, lambda: [], refresh, delay=0.05)
    loop.start(contextvars.copy_context())
    try:
        for _ in range(5):  # pod created, scheduled, started...: one refresh
            loop.soon("ml", "a")
        assert started.wait(5)
        loop.soon("ml", "a")  # an event while that refresh runs: it may have read too early
        release.set()
        deadline = threading.Event()
        for _ in range(100):
            if len(ran) >= 2:
                break
            deadline.wait(0.05)
        deadline.wait(0.3)  # nothing more comes
        assert ran == ["a", "a"]
    finally:
        loop.stop()
