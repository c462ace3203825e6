"""#14 item 8: an InferenceService reconciliation that failed was logged and dropped (kopf does
not retry event handlers). It is retried with backoff until one succeeds."""

from __future__ import annotations

import threading

from finetune_operator import metrics
from finetune_operator.serving import handlers


def test_a_failed_reconcile_is_retried_with_backoff_until_it_succeeds(monkeypatch):
    calls: list[float] = []
    done = threading.Event()

    def flaky(namespace, name):
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("API server away")
        done.set()

    monkeypatch.setattr(handlers, "reconcile", flaky)
    monkeypatch.setattr(handlers, "RETRY_BASE", 0.05)
    errors = metrics.reconcile_errors._value.get()
    handlers.reconcile_logged("ns", "srv")
    assert done.wait(10), "the retries never succeeded"
    assert len(calls) == 3 and metrics.reconcile_errors._value.get() == errors + 2
    assert ("ns", "srv") not in handlers._retries  # nothing left pending after a success


def test_events_during_a_pending_retry_do_not_stack_more_retries(monkeypatch):
    calls = []
    monkeypatch.setattr(handlers, "reconcile", lambda ns, n: calls.append(1) or (_ for _ in ()).throw(OSError("x")))
    monkeypatch.setattr(handlers, "RETRY_BASE", 30.0)
    for _ in range(5):
        handlers.reconcile_logged("ns", "busy")
    try:
        assert len(calls) == 5
        pending = [k for k, (_, t) in handlers._retries.items() if k == ("ns", "busy") and t is not None]
        assert pending == [("ns", "busy")]
    finally:
        _, timer = handlers._retries.pop(("ns", "busy"))
        timer.cancel()


def test_a_finetunejob_event_finds_its_servers_from_their_own_events_without_a_list():
    from finetune_operator.serving.references import References

    def isvc(name, *jobs, namespace="team-a"):
        return {"apiVersion": "finetune.dev/v1alpha1", "kind": "InferenceService",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"model": {"source": "org/base"},
                         "adapters": [{"name": j, "fineTuneJobRef": {"name": j}} for j in jobs]}}

    refs = References()
    refs.observe("ADDED", isvc("shared", "support", "legal"))
    refs.observe("ADDED", isvc("solo", "support"))
    refs.observe(None, isvc("other-ns", "support", namespace="team-b"))
    assert refs.servers_of("team-a", "support") == ["shared", "solo"]
    assert refs.servers_of("team-a", "legal") == ["shared"]
    refs.observe("MODIFIED", isvc("shared", "legal"))  # support's adapter entry removed
    assert refs.servers_of("team-a", "support") == ["solo"]
    refs.observe("DELETED", isvc("solo", "support"))
    assert refs.servers_of("team-a", "support") == [] and refs.servers_of("team-b", "support") == ["other-ns"]


def test_a_retry_runs_in_the_failed_handlers_context(monkeypatch):
    """kopf's settings and event queue are context variables: a retry on a timer thread without
    them could not post the Events of the FineTuneJob refresh it makes (time-to-serve, #14)."""
    import contextvars

    var = contextvars.ContextVar("kopf_settings_stand_in")
    seen: list[object] = []
    done = threading.Event()

    def reconcile(namespace, name):
        seen.append(var.get("missing"))
        if len(seen) == 1:
            raise ConnectionError("API server away")
        done.set()

    monkeypatch.setattr(handlers, "reconcile", reconcile)
    monkeypatch.setattr(handlers, "RETRY_BASE", 0.05)

    def handler():
        var.set("kopf settings")
        handlers.reconcile_logged("ns", "ctx")

    contextvars.copy_context().run(handler)
    assert done.wait(10), "the retry never ran"
    assert seen == ["kopf settings", "kopf settings"]
