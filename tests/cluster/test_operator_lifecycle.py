"""The operator as a real process against the real control plane (issue 5).

Pods on the fake kwok GPU nodes are completed by kwok (exit 0) as soon as they run. Tests
that need a pod to fail pin it to a node selector no node has, so it stays Pending, and
then write a terminal status onto it the way a kubelet would: that is a simulation of the
trainer's exit on a fake node, said so in each such test.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.fixtures.cluster import get_json, wait_for

pytestmark = pytest.mark.cluster

NOWHERE = {"finetune.dev/test-node": "nowhere"}


def ftj(name: str, **overrides) -> dict:
    spec = {"model": {"source": "org/tiny"},
            "dataset": {"source": "pvc://%s-workspace/data/train.jsonl" % name},
            "resources": {"gpusPerNode": 1},
            "training": {"precision": "fp32"}}
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name}, "spec": spec}


def apply(cluster, namespace, obj) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def status(cluster, namespace, name) -> dict:
    return get_json(cluster, "ftj", name, "-n", namespace).get("status") or {}


def wait_phase(cluster, namespace, name, phase, timeout=90, reason=None) -> dict:
    def reached():
        s = status(cluster, namespace, name)
        if s.get("phase") != phase:
            return None
        if reason is not None and reason not in [c.get("reason") for c in s.get("conditions", [])]:
            return None
        return s
    return wait_for(reached, timeout=timeout, what=f"{name} to be {phase}" + (f" ({reason})" if reason else ""))


def trainer_jobs(cluster, namespace, name) -> list[dict]:
    return get_json(cluster, "jobs", "-n", namespace, "-l",
                    f"finetune.dev/finetunejob={name},app.kubernetes.io/component=trainer")["items"]


def trainer_pods(cluster, namespace, name) -> list[dict]:
    return get_json(cluster, "pods", "-n", namespace, "-l",
                    f"finetune.dev/finetunejob={name},app.kubernetes.io/component=trainer")["items"]


def fail_pod(cluster, namespace, pod: dict, exit_code: int, message: str = "", disrupted: bool = False) -> None:
    """Write a terminal status onto a pending pod, as a kubelet would (a simulation)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conditions = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                   "message": "preempted for a higher-priority pod", "lastTransitionTime": now}] if disrupted else []
    body = {"status": {"phase": "Failed", "conditions": conditions, "containerStatuses": [{
        "name": "trainer", "image": "finetune-trainer:test", "imageID": "", "ready": False, "restartCount": 0,
        "state": {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message,
                                 "startedAt": now, "finishedAt": now}}}]}}
    cluster.kubectl("patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status",
                    "--type=strategic", "-p", json.dumps(body))


def test_children_are_created_and_a_kwok_run_succeeds(cluster, namespace, operator):
    apply(cluster, namespace, ftj("ok"))
    s = wait_phase(cluster, namespace, "ok", "Succeeded")

    claim = get_json(cluster, "pvc", "ok-workspace", "-n", namespace)
    assert "ownerReferences" not in claim["metadata"]  # Retain by default
    get_json(cluster, "sa", "ok-trainer", "-n", namespace)
    role = get_json(cluster, "role", "ok-trainer", "-n", namespace)
    assert role["rules"][1]["resources"] == ["finetunejobs/status"]
    assert role["rules"][1]["resourceNames"] == ["ok"]
    config = json.loads(get_json(cluster, "cm", "ok-trainer-config", "-n", namespace)["data"]["config.json"])
    assert config["dataset"]["source"] == "/workspace/data/train.jsonl"
    (job,) = trainer_jobs(cluster, namespace, "ok")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "finetune_trainer"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    pod = trainer_pods(cluster, namespace, "ok")[0]
    assert pod["spec"]["nodeName"].startswith("gpu-node-")

    types = {c["type"]: c for c in s["conditions"]}
    assert types["Admitted"]["status"] == "True"
    assert types["Succeeded"]["status"] == "True"
    assert all(c["observedGeneration"] == 1 for c in s["conditions"])
    assert s["trainerJob"] == "ok-trainer" and s["startTime"] and s["completionTime"]
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                             "involvedObject.kind=FineTuneJob,involvedObject.name=ok").stdout
    assert "Succeeded" in events and "TrainerJobCreated" in events
    assert 'finetune_operator_phase_transitions_total{from="Pending",to="Succeeded"}' in operator.metrics() \
        or "finetune_operator_phase_transitions_total" in operator.metrics()


def test_more_gpus_than_any_node_fails_with_insufficient_capacity(cluster, namespace, operator):
    apply(cluster, namespace, ftj("huge", resources={"gpusPerNode": 16}))
    s = wait_phase(cluster, namespace, "huge", "Failed", reason="InsufficientGPUCapacity")
    cond = next(c for c in s["conditions"] if c["type"] == "Admitted")
    assert cond["status"] == "False" and "largest node has 8" in cond["message"]
    assert trainer_jobs(cluster, namespace, "huge") == []
    assert cluster.kubectl("get", "pvc", "huge-workspace", "-n", namespace, check=False).returncode != 0


def test_missing_secret_waits_and_creating_it_lets_the_job_start(cluster, namespace, operator):
    apply(cluster, namespace, ftj("tok", model={"tokenSecretRef": {"name": "hf"}}, resources={"nodeSelector": NOWHERE}))
    wait_phase(cluster, namespace, "tok", "Pending", reason="SecretNotFound")
    assert trainer_jobs(cluster, namespace, "tok") == []
    cluster.kubectl("create", "secret", "generic", "hf", "--from-literal=token=hf_SECRET123", "-n", namespace)
    wait_for(lambda: trainer_jobs(cluster, namespace, "tok"), timeout=60, what="the trainer Job once the Secret exists")
    cm = get_json(cluster, "cm", "tok-trainer-config", "-n", namespace)
    assert "hf_SECRET123" not in cm["data"]["config.json"]
    assert json.loads(cm["data"]["config.json"])["model"]["tokenEnv"] == "HF_TOKEN"


def test_unschedulable_pod_is_reported_with_the_schedulers_message(cluster, namespace, operator):
    apply(cluster, namespace, ftj("stuck", resources={"nodeSelector": NOWHERE}))
    s = wait_phase(cluster, namespace, "stuck", "Pending", reason="Unschedulable")
    running = next(c for c in s["conditions"] if c["type"] == "Running")
    assert "node" in running["message"]


def test_disruption_is_retried_without_counting_and_exit_42_fails_at_once(cluster, namespace, operator):
    """Simulated trainer exits: the pods stay Pending on no node and get a terminal status."""
    apply(cluster, namespace, ftj("bad", resources={"nodeSelector": NOWHERE}))
    first = wait_for(lambda: trainer_pods(cluster, namespace, "bad"), timeout=60, what="the first pod")[0]
    fail_pod(cluster, namespace, first, 143, disrupted=True)
    second = wait_for(lambda: [p for p in trainer_pods(cluster, namespace, "bad")
                               if p["metadata"]["uid"] != first["metadata"]["uid"]],
                      timeout=60, what="a replacement pod after the disruption")[0]
    s = status(cluster, namespace, "bad")
    assert s["phase"] != "Failed" and s.get("restarts", 0) == 0

    message = json.dumps({"reason": "DataValidationFailed", "message": "2 of 3 records are invalid",
                          "firstErrors": ['line 2: field "output" is missing (format: instruction)']})
    fail_pod(cluster, namespace, second, 42, message)
    s = wait_phase(cluster, namespace, "bad", "Failed", reason="DataValidationFailed")
    failed = next(c for c in s["conditions"] if c["type"] == "Failed")
    assert 'field "output" is missing' in failed["message"]
    time.sleep(3)  # nothing should come after a permanent failure
    assert len(trainer_pods(cluster, namespace, "bad")) == 2


def test_suspend_stops_the_trainer_and_resume_starts_it_again(cluster, namespace, operator):
    apply(cluster, namespace, ftj("sus", resources={"nodeSelector": NOWHERE}))
    wait_for(lambda: trainer_pods(cluster, namespace, "sus"), timeout=60, what="the trainer pod")
    cluster.kubectl("patch", "ftj", "sus", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_phase(cluster, namespace, "sus", "Suspended")
    # The phase follows spec.suspend at once; the Job is suspended by the update handler.
    wait_for(lambda: [j["spec"].get("suspend") for j in trainer_jobs(cluster, namespace, "sus")] == [True],
             timeout=30, what="the trainer Job to be suspended")
    wait_for(lambda: not [p for p in trainer_pods(cluster, namespace, "sus") if p["status"].get("phase") == "Pending"],
             timeout=60, what="the suspended Job's pods to go")
    get_json(cluster, "pvc", "sus-workspace", "-n", namespace)
    cluster.kubectl("patch", "ftj", "sus", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: trainer_jobs(cluster, namespace, "sus")[0]["spec"]["suspend"] is False, timeout=60,
             what="the Job to be resumed")
    wait_phase(cluster, namespace, "sus", "Pending")
    assert len(trainer_jobs(cluster, namespace, "sus")) == 1


@pytest.mark.parametrize("policy", ["Retain", "Delete"])
def test_deleting_the_job_keeps_or_deletes_the_claim(cluster, namespace, operator, policy):
    name = f"del-{policy.lower()}"
    apply(cluster, namespace, ftj(name, storage={"reclaimPolicy": policy}, resources={"nodeSelector": NOWHERE}))
    wait_for(lambda: trainer_jobs(cluster, namespace, name), timeout=60, what="the trainer Job")
    cluster.kubectl("delete", "ftj", name, "-n", namespace, "--timeout=60s")
    wait_for(lambda: not trainer_jobs(cluster, namespace, name), timeout=60, what="the Job to be collected")
    claim = f"{name}-workspace"
    if policy == "Retain":
        time.sleep(2)
        assert "ownerReferences" not in get_json(cluster, "pvc", claim, "-n", namespace)["metadata"]
    else:
        wait_for(lambda: cluster.kubectl("get", "pvc", claim, "-n", namespace, check=False).returncode != 0,
                 timeout=90, what="the claim to be deleted")


def test_operator_killed_at_any_point_never_duplicates_the_job(cluster, namespace, operator):
    apply(cluster, namespace, ftj("kill", resources={"nodeSelector": NOWHERE}))
    operator.restart()  # killed while handling the creation
    job = wait_for(lambda: trainer_jobs(cluster, namespace, "kill"), timeout=60, what="the Job")[0]
    operator.restart()  # killed after creating the Job
    wait_phase(cluster, namespace, "kill", "Pending", reason="Unschedulable")
    operator.kill()
    cluster.kubectl("patch", "ftj", "kill", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    operator.start()  # a transition that happened while it was down
    wait_phase(cluster, namespace, "kill", "Suspended")
    jobs = trainer_jobs(cluster, namespace, "kill")
    assert [j["metadata"]["uid"] for j in jobs] == [job["metadata"]["uid"]]
    assert operator.starts == 4


def test_trainer_token_patches_its_own_status_only(cluster, namespace, operator):
    for name in ("mine", "theirs"):
        apply(cluster, namespace, ftj(name, resources={"nodeSelector": NOWHERE}))
    wait_for(lambda: cluster.kubectl("get", "rolebinding", "mine-trainer", "-n", namespace, check=False).returncode == 0
             and cluster.kubectl("get", "rolebinding", "theirs-trainer", "-n", namespace, check=False).returncode == 0,
             timeout=60, what="the trainer RoleBindings")
    token = cluster.kubectl("create", "token", "mine-trainer", "-n", namespace).stdout.strip()
    patch = json.dumps({"status": {"progress": {"step": 3, "totalSteps": 10}}})

    def patch_own():
        return cluster.kubectl("patch", "ftj", "mine", "-n", namespace, "--subresource=status", "--type=merge",
                               "-p", patch, token=token, check=False).returncode == 0
    wait_for(patch_own, timeout=30, what="the trainer token to patch its own status")
    denied = cluster.kubectl("patch", "ftj", "theirs", "-n", namespace, "--subresource=status", "--type=merge",
                             "-p", patch, token=token, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    assert cluster.kubectl("get", "secrets", "-n", namespace, token=token, check=False).returncode != 0
    assert status(cluster, namespace, "mine")["progress"]["step"] == 3  # the operator leaves it alone


def test_ttl_after_finished_deletes_the_job_and_keeps_a_retained_claim(cluster, namespace, operator):
    """ttlSecondsAfterFinished: the finished FineTuneJob and its trainer Job go; a Retain claim stays."""
    apply(cluster, namespace, ftj("short", ttlSecondsAfterFinished=5))
    wait_phase(cluster, namespace, "short", "Succeeded")
    wait_for(lambda: cluster.kubectl("get", "ftj", "short", "-n", namespace, check=False).returncode != 0,
             timeout=90, what="the FineTuneJob to be deleted after its TTL")
    wait_for(lambda: trainer_jobs(cluster, namespace, "short") == [], timeout=60,
             what="the trainer Job to be garbage-collected")
    claim = get_json(cluster, "pvc", "short-workspace", "-n", namespace)
    assert claim["metadata"].get("deletionTimestamp") is None
    events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                             "involvedObject.name=short").stdout
    assert "Expired" in events
