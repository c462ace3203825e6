"""spec.objectStorage and output.push in the operator: admission waits for the Secret and its
two required keys, the trainer gets the AWS variables from it (never the values), and the
Pushed condition and status.artifacts.volume follow what the trainer reported."""

from __future__ import annotations

import datetime as dt

from finetune_operator.admission import ClusterFacts, check
from finetune_operator.builders.trainer_job import build_trainer_job
from finetune_operator.status import Observation, Phase, push_condition, status_patch
from tests.unit.operator.test_builders_manifests import make_job

SPEC = {"model": {"source": "s3://models/tiny/"}, "dataset": {"source": "s3://data/train.jsonl"},
        "output": {"push": {"uri": "s3://out/run"}},
        "objectStorage": {"secretRef": {"name": "s3"}}}
NOW = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)


def test_admission_waits_for_the_object_storage_secret_and_its_key_pair():
    j = make_job(SPEC)
    missing = check(j, ClusterFacts())
    assert missing.reason == "SecretNotFound" and missing.retryable
    assert missing.message.startswith("spec.objectStorage.secretRef: Secret ml/s3 does not exist")
    no_secret_key = check(j, ClusterFacts(secrets={"s3": {"AWS_ACCESS_KEY_ID"}}))
    assert no_secret_key.reason == "SecretKeyNotFound" and "AWS_SECRET_ACCESS_KEY" in no_secret_key.message
    assert check(j, ClusterFacts(secrets={"s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}})) is None


def test_trainer_gets_the_aws_variables_by_reference_only():
    pod = build_trainer_job(make_job(SPEC), image="trainer:1")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                "AWS_ENDPOINT_URL"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "s3" and ref["key"] == key and "value" not in env[key]
        assert ref["optional"] is (key not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))


def test_pushed_condition_follows_the_trainers_report():
    assert push_condition(make_job(SPEC)) is None
    ok = push_condition(make_job(SPEC, artifacts={"adapter": "/workspace/artifacts/adapter",
                                                  "pushed": "s3://out/run"}))
    assert (ok.type, ok.status, ok.reason) == ("Pushed", "True", "Pushed")
    failed = push_condition(make_job(SPEC, artifacts={"pushError": "push to s3://out/run failed: HTTP 403"}))
    assert (failed.type, failed.status, failed.reason) == ("Pushed", "False", "PushFailed")
    assert "HTTP 403" in failed.message and "The job succeeded" in failed.message


def test_a_failed_push_leaves_the_job_succeeded_with_pushed_false_and_the_volume_named():
    j = make_job(SPEC, artifacts={"pushError": "push failed"})
    patch = status_patch(j, Observation(Phase.SUCCEEDED, "TrainingCompleted", "done"), now=NOW,
                         gpu_hour_price=0, existing_conditions=[])
    conditions = {c["type"]: c for c in patch["conditions"]}
    assert patch["phase"] == "Succeeded" and conditions["Succeeded"]["status"] == "True"
    assert conditions["Pushed"]["status"] == "False"
    assert patch["artifacts"] == {"volume": "support-bot-workspace"}


def test_resources_cpu_is_both_request_and_limit():
    pod = build_trainer_job(make_job({**SPEC, "resources": {"cpu": "3"}}), image="trainer:1")
    resources = pod["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "3"
