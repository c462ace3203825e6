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
    try:
        assert sorted(n for _, n in finetunejob.due_for_resync()) == ["done-ttl", "training"]
    finally:
        cache.reset()


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
