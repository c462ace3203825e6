"""#14: the finetune_operator_jobs gauge follows each job's phase without counting every job
again on every refresh (that was O(N) per refresh, under a lock all refresh threads share)."""

from __future__ import annotations

from finetune_operator import metrics
from finetune_operator.handlers import records


def gauge(phase: str) -> float:
    return metrics.registry.get_sample_value(metrics.JOBS, {"phase": phase})


def test_the_gauge_moves_with_each_job_and_forgets_the_gone():
    with records._phases_guard:  # other tests set the gauge directly, or leave jobs behind
        records._phases.clear()
        records._counts.update({p: 0 for p in records._counts})
        metrics.set_job_counts(records._counts, tuple(records._counts))
    base = {p: gauge(p) or 0.0 for p in ("Pending", "Training", "Succeeded")}
    assert gauge("Evaluating") is not None  # every phase's series exists from the start
    try:
        with records._phases_guard:
            records._set_phase(("t", "a"), "Training")
            records._set_phase(("t", "b"), "Training")
            records._set_phase(("t", "b"), "Training")  # a refresh that moves nothing
        assert gauge("Training") == base["Training"] + 2
        with records._phases_guard:
            records._set_phase(("t", "a"), "Succeeded")
        assert gauge("Training") == base["Training"] + 1
        assert gauge("Succeeded") == base["Succeeded"] + 1
        records.forget("t", "b")
        records.forget("t", "b")  # forgotten twice (deletion handler, then the resync's prune)
        assert gauge("Training") == base["Training"]
    finally:
        records.forget("t", "a")
    assert {p: gauge(p) for p in base} == base
