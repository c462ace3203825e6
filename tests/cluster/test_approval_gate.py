"""The approval gate against the real API server (issue 22): a job with
spec.deploy.requireApproval waits in AwaitingApproval after training and its comparison,
deploys once `finetune.dev/approved=true` is set, and ends Succeeded without a deployment
on `=false`.

The trainer and comparison pods run on the fake kwok GPU nodes, which complete them with
exit 0 (a stand-in for a GPU): the comparison therefore reports nothing, which the job
shows as `Compared False (NotReported)` and goes on. The real comparison through vLLM is
tests/e2e/test_operator_realrun.py.
"""

from __future__ import annotations

import pytest

from tests.cluster.test_operator_lifecycle import apply, ftj, status, trainer_jobs, wait_phase
from tests.fixtures.cluster import get_json

pytestmark = pytest.mark.cluster


def gated(name: str) -> dict:
    return ftj(name, deploy={"inferenceService": name, "requireApproval": True, "gpus": 1})


def conditions(s: dict) -> dict[str, dict]:
    return {c["type"]: c for c in s.get("conditions", [])}


def inference_services(cluster, namespace) -> list[str]:
    return [i["metadata"]["name"] for i in get_json(cluster, "ftisvc", "-n", namespace)["items"]]


def test_a_gated_job_waits_then_deploys_once_approved(cluster, namespace, operator):
    apply(cluster, namespace, gated("gate"))
    s = wait_phase(cluster, namespace, "gate", "AwaitingApproval", timeout=120)

    approved = conditions(s)["Approved"]
    assert (approved["status"], approved["reason"]) == ("False", "AwaitingApproval")
    assert f"/jobs/{namespace}/gate/report" in approved["message"]
    assert "finetune.dev/approved=true" in approved["message"]
    assert conditions(s)["Compared"]["reason"] == "NotReported"
    assert [j["metadata"]["name"] for j in get_json(cluster, "jobs", "-n", namespace, "-l",
            "finetune.dev/finetunejob=gate,app.kubernetes.io/component=comparison")["items"]] == ["gate-compare"]
    assert len(trainer_jobs(cluster, namespace, "gate")) == 1
    assert inference_services(cluster, namespace) == []
    described = cluster.kubectl("describe", "ftj", "gate", "-n", namespace).stdout
    assert "AwaitingApproval" in described

    cluster.kubectl("annotate", "ftj", "gate", "-n", namespace, "finetune.dev/approved=true")
    s = wait_phase(cluster, namespace, "gate", "Succeeded", timeout=180, reason="Deployed")
    assert conditions(s)["Approved"]["status"] == "True"
    assert inference_services(cluster, namespace) == ["gate"]
    assert s["inferenceService"]["name"] == "gate"


def test_a_rejected_job_ends_succeeded_without_a_deployment(cluster, namespace, operator):
    apply(cluster, namespace, gated("nope"))
    wait_phase(cluster, namespace, "nope", "AwaitingApproval", timeout=120)

    cluster.kubectl("annotate", "ftj", "nope", "-n", namespace, "finetune.dev/approved=false",
                    "finetune.dev/approval-reason=answers invent order numbers")
    s = wait_phase(cluster, namespace, "nope", "Succeeded", timeout=60, reason="Rejected")
    rejected = conditions(s)["Approved"]
    assert (rejected["status"], rejected["reason"]) == ("False", "Rejected")
    assert "answers invent order numbers" in rejected["message"]
    assert conditions(s)["Succeeded"]["reason"] == "Rejected"
    assert "inferenceService" not in s
    assert inference_services(cluster, namespace) == []
    assert status(cluster, namespace, "nope")["phase"] == "Succeeded"
