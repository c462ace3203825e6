"""#14 item 8: pod events of jobs whose names exceed 63 characters were never mapped back to
the job (its label holds a hashed form). The trainer pod carries the full name as an annotation."""

from __future__ import annotations

from finetune_operator.builders import trainer_job
from finetune_operator.handlers import finetunejob
from finetune_operator.labels import FINETUNEJOB
from tests.unit.operator.test_builders_manifests import make_job

LONG = "a-job-with-a-name-much-longer-than-the-sixty-three-characters-a-label-holds"


def test_a_trainer_pod_event_reaches_a_job_with_a_long_name(monkeypatch):
    job = make_job({"model": {"source": "org/tiny"}, "dataset": {"source": "pvc://x/data/t.jsonl"}}, name=LONG)
    template = trainer_job.build_trainer_job(job, "img")["spec"]["template"]
    assert len(template["metadata"]["labels"][FINETUNEJOB]) <= 63 != len(LONG)
    refreshed = []
    monkeypatch.setattr(finetunejob, "refresh_status", lambda ns, name: refreshed.append((ns, name)))
    pod = {"metadata": {"namespace": "ml", "name": "p", **template["metadata"]}}
    finetunejob.on_trainer_pod_event(pod)
    assert refreshed == [("ml", LONG)]
