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

from tests.fixtures.cluster import get_json, trainer_config_of, wait_for

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
    (job,) = trainer_jobs(cluster, namespace, "ok")
    assert trainer_config_of(job)["dataset"]["source"] == "/workspace/data/train.jsonl"
    # The review ConfigMap the comparison filled (created with the comparison Job), owned by the job.
    review = get_json(cluster, "cm", "ok-review", "-n", namespace)
    assert [r["uid"] for r in review["metadata"]["ownerReferences"]] == [job["metadata"]["ownerReferences"][0]["uid"]]
    # The config travels in the Job (no ConfigMap of its own): the pods got it as created.
    assert cluster.kubectl("get", "cm", "ok-trainer-config", "-n", namespace, check=False).returncode != 0
    pod = trainer_pods(cluster, namespace, "ok")[0]
    assert json.loads(pod["metadata"]["annotations"]["finetune.dev/trainer-config"]) == trainer_config_of(job)
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


def events(cluster, namespace, name) -> list[dict]:
    return get_json(cluster, "events", "-n", namespace, "--field-selector",
                    f"involvedObject.kind=FineTuneJob,involvedObject.name={name}")["items"]


def test_more_gpus_than_any_node_waits_for_the_cluster_to_grow(cluster, namespace, operator):
    """A pool that scales from zero: the Job and its pod exist (an autoscaler adds nodes only for
    pending pods), and the job is Pending with the scheduler's own message, never Failed."""
    apply(cluster, namespace, ftj("huge", resources={"gpusPerNode": 16}))
    wait_phase(cluster, namespace, "huge", "Pending", reason="Unschedulable")

    def schedulers_gpu_message():  # once the claim is bound, kube-scheduler's "Insufficient nvidia.com/gpu"
        s = status(cluster, namespace, "huge")
        running = next((c for c in s.get("conditions", []) if c["type"] == "Running"), {})
        return s.get("phase") == "Pending" and "nvidia.com/gpu" in running.get("message", "")
    wait_for(schedulers_gpu_message, timeout=60, what="the scheduler's GPU message in the status")
    assert len(trainer_jobs(cluster, namespace, "huge")) == 1
    warned = [e for e in events(cluster, namespace, "huge") if e["reason"] == "WaitingForGPUCapacity"]
    assert len(warned) == 1 and "largest current node has 8" in warned[0]["message"]
    # A node with 16 GPUs joins (what cluster-autoscaler or Karpenter would do): the pod runs.
    cluster.add_kwok_node("gpu-node-big", gpus=16)
    try:
        wait_for(lambda: status(cluster, namespace, "huge").get("phase") in ("Validating", "Training", "Succeeded"),
                 timeout=120, what="the job to start once a node fits")
    finally:
        cluster.kubectl("delete", "node", "gpu-node-big", check=False)


@pytest.mark.operator_args("--capacity-policy", "fail")
def test_more_gpus_than_any_node_fails_when_the_cluster_cannot_grow(cluster, namespace, operator):
    apply(cluster, namespace, ftj("huge", resources={"gpusPerNode": 16}))
    s = wait_phase(cluster, namespace, "huge", "Failed", reason="InsufficientGPUCapacity")
    cond = next(c for c in s["conditions"] if c["type"] == "Admitted")
    assert cond["status"] == "False" and "largest current node has 8" in cond["message"]
    assert trainer_jobs(cluster, namespace, "huge") == []
    assert cluster.kubectl("get", "pvc", "huge-workspace", "-n", namespace, check=False).returncode != 0


def test_missing_secret_waits_and_creating_it_lets_the_job_start(cluster, namespace, operator):
    apply(cluster, namespace, ftj("tok", model={"tokenSecretRef": {"name": "hf"}}, resources={"nodeSelector": NOWHERE}))
    wait_phase(cluster, namespace, "tok", "Pending", reason="SecretNotFound")
    assert trainer_jobs(cluster, namespace, "tok") == []
    # Waiting is quiet: the operator re-checks on every admission retry, but announces the
    # problem once (no Warning event and no status write per retry).
    def admitted():
        return next(c for c in status(cluster, namespace, "tok")["conditions"] if c["type"] == "Admitted")
    first = admitted()
    retries = _admission_retries(operator)
    wait_for(lambda: _admission_retries(operator) >= retries + 2, timeout=60, what="two more admission retries")
    assert admitted() == first
    assert [e["count"] if e.get("count") else 1 for e in events(cluster, namespace, "tok")
            if e["reason"] == "SecretNotFound"] == [1]
    cluster.kubectl("create", "secret", "generic", "hf", "--from-literal=token=hf_SECRET123", "-n", namespace)
    wait_for(lambda: trainer_jobs(cluster, namespace, "tok"), timeout=60, what="the trainer Job once the Secret exists")
    (job,) = trainer_jobs(cluster, namespace, "tok")
    assert "hf_SECRET123" not in json.dumps(job)
    assert trainer_config_of(job)["model"]["tokenEnv"] == "HF_TOKEN"


def _admission_retries(operator) -> int:
    return operator.log.read_text().count("does not exist; create it")


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


def test_only_jobs_with_something_to_release_hold_a_finalizer(cluster, namespace, operator):
    """#14 (requests per job): a finalizer costs a patch to add and one to remove, and kopf's
    handled-spec annotation one more write per change. A job with nothing to release on
    deletion holds no finalizer and carries no kopf annotation; one whose claim it owns
    (reclaimPolicy Delete) does, and keeps it after a switch to Retain, so that the switch
    still takes its owner reference off the claim before the job goes."""
    apply(cluster, namespace, ftj("plain", resources={"nodeSelector": NOWHERE}))
    apply(cluster, namespace, ftj("owned", storage={"reclaimPolicy": "Delete"}, suspend=True))
    for name in ("plain", "owned"):
        wait_for(lambda: trainer_jobs(cluster, namespace, name), timeout=60, what=f"{name}'s trainer Job")
    plain = get_json(cluster, "ftj", "plain", "-n", namespace)["metadata"]
    assert not plain.get("finalizers"), plain.get("finalizers")
    # Neither kopf's handled-spec copy nor its progress records or marker (kept in memory).
    assert not [a for a in plain.get("annotations") or {} if a.startswith(("finetune.dev/", "kopf."))], \
        plain.get("annotations")
    owned = get_json(cluster, "ftj", "owned", "-n", namespace)["metadata"]
    assert owned.get("finalizers") == ["finetune.dev/finalizer"]
    claim = get_json(cluster, "pvc", "owned-workspace", "-n", namespace)["metadata"]
    assert [r["uid"] for r in claim.get("ownerReferences") or []] == [owned["uid"]]

    cluster.kubectl("patch", "ftj", "owned", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"storage": {"reclaimPolicy": "Retain"}}}))
    cluster.kubectl("delete", "ftj", "owned", "plain", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(lambda: not trainer_jobs(cluster, namespace, "owned"), timeout=60, what="the Job to be collected")
    claim = get_json(cluster, "pvc", "owned-workspace", "-n", namespace)["metadata"]
    assert not claim.get("deletionTimestamp") and not claim.get("ownerReferences"), claim


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


def test_a_job_recreated_under_the_same_name_never_adopts_the_old_ones_children(cluster, namespace, operator):
    """#14 item 6: the new job adopted the old one's ServiceAccount, Role, RoleBinding and ConfigMap
    on 409, and the garbage collector then deleted them under it. A finalizer on the old review
    ConfigMap holds it (as a slow garbage collector would) while the job is re-created: it was
    created without an owner check, so the new job took the old one's and lost it. The review
    ConfigMap is created with the comparison Job, so both jobs run on kwok to that point."""
    apply(cluster, namespace, ftj("again"))
    wait_phase(cluster, namespace, "again", "Succeeded", timeout=180)
    old_uid = get_json(cluster, "ftj", "again", "-n", namespace)["metadata"]["uid"]
    cluster.kubectl("patch", "cm", "again-review", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"metadata": {"finalizers": ["test.finetune.dev/hold"]}}))
    cluster.kubectl("delete", "ftj", "again", "-n", namespace, "--wait=true", "--timeout=60s")
    apply(cluster, namespace, ftj("again"))
    new_uid = get_json(cluster, "ftj", "again", "-n", namespace)["metadata"]["uid"]
    assert new_uid != old_uid
    wait_for(lambda: "ConfigMap again-review still belongs to an earlier FineTuneJob again"
             in operator.log.read_text(), timeout=120,
             what="the operator to wait for the old review ConfigMap instead of taking it")
    comparison = get_json(cluster, "jobs", "-n", namespace, "-l",
                          "finetune.dev/finetunejob=again,app.kubernetes.io/component=comparison")["items"]
    assert all(j["metadata"]["ownerReferences"][0]["uid"] != new_uid for j in comparison)
    assert status(cluster, namespace, "again").get("phase") != "Succeeded"
    cluster.kubectl("patch", "cm", "again-review", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"metadata": {"finalizers": None}}))

    wait_phase(cluster, namespace, "again", "Succeeded", timeout=180)
    for kind, name in (("serviceaccount", "again-trainer"), ("role", "again-trainer"),
                       ("rolebinding", "again-trainer"), ("configmap", "again-review"),
                       ("job", "again-trainer")):
        obj = get_json(cluster, kind, name, "-n", namespace)
        assert [r["uid"] for r in obj["metadata"]["ownerReferences"]] == [new_uid], (kind, obj["metadata"])


def test_deploy_added_to_a_succeeded_job_deploys_it(cluster, namespace, operator):
    """#14 item 4: spec.deploy added after training did nothing. The InferenceService's pods run
    on a kwok GPU node (Ready at once; no vLLM runs there)."""
    apply(cluster, namespace, ftj("late"))
    wait_phase(cluster, namespace, "late", "Succeeded")
    cluster.kubectl("patch", "ftj", "late", "-n", namespace, "--type=merge", "-p", json.dumps(
        {"spec": {"deploy": {"inferenceService": "late-server", "gpus": 1}}}))

    def deployed():
        s = status(cluster, namespace, "late")
        return s.get("phase") == "Succeeded" and (s.get("inferenceService") or {}).get("name") == "late-server" and s
    s = wait_for(deployed, timeout=180, what="the late deploy to be served")
    isvc = get_json(cluster, "inferenceservice", "late-server", "-n", namespace)
    assert [a["fineTuneJobRef"]["name"] for a in isvc["spec"]["adapters"]] == ["late"]
    assert next(c for c in s["conditions"] if c["type"] == "Succeeded")["reason"] == "Deployed"
    assert len(trainer_jobs(cluster, namespace, "late")) == 1, "deploying never trains again"
    reasons = {e["reason"] for e in events(cluster, namespace, "late")}
    assert "Deploying" in reasons


def test_a_recreated_trainer_job_runs_the_image_resolved_first(cluster, namespace, operator):
    """#14 item 8: the trainer image was resolved again whenever the Job was re-created (a job
    resumed by Kueue could switch trainer versions after an operator upgrade)."""
    apply(cluster, namespace, ftj("pinned", resources={"nodeSelector": NOWHERE}))
    (first,) = wait_for(lambda: trainer_jobs(cluster, namespace, "pinned"), timeout=90, what="the trainer Job")
    wait_for(lambda: status(cluster, namespace, "pinned").get("trainerImage") == "finetune-trainer:test",
             timeout=60, what="status.trainerImage")
    operator.extra_args = [*operator.extra_args, "--trainer-image", "finetune-trainer:upgraded"]
    operator.restart()
    cluster.kubectl("delete", "job", first["metadata"]["name"], "-n", namespace, "--cascade=foreground",
                    "--wait=true", "--timeout=60s")

    def recreated():
        jobs = [j for j in trainer_jobs(cluster, namespace, "pinned")
                if j["metadata"]["uid"] != first["metadata"]["uid"]]
        return jobs and jobs[0]
    again = wait_for(recreated, timeout=90, what="the trainer Job created again")
    assert again["spec"]["template"]["spec"]["containers"][0]["image"] == "finetune-trainer:test"
    assert status(cluster, namespace, "pinned")["trainerImage"] == "finetune-trainer:test"


def _deployed(cluster, namespace, name, server):
    def done():
        s = status(cluster, namespace, name)
        return s.get("phase") == "Succeeded" and (s.get("inferenceService") or {}).get("name") == server and s
    return wait_for(done, timeout=180, what=f"{name} to be served by {server}")


def _isvc(cluster, namespace, name):
    r = cluster.kubectl("get", "inferenceservice", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def test_deleting_a_deployed_job_takes_away_what_its_deploy_added(cluster, namespace, operator):
    """#14 item 5: a deleted job's adapter entry stayed in a shared InferenceService, which went
    Ready=False (FineTuneJobNotFound) while it served the other adapters. Pods run on kwok."""
    deploy = {"inferenceService": "shared", "gpus": 1}
    apply(cluster, namespace, ftj("first", deploy=deploy))
    _deployed(cluster, namespace, "first", "shared")
    apply(cluster, namespace, ftj("second", deploy=deploy))
    _deployed(cluster, namespace, "second", "shared")
    assert [a["name"] for a in _isvc(cluster, namespace, "shared")["spec"]["adapters"]] == ["first", "second"]

    cluster.kubectl("delete", "ftj", "second", "-n", namespace, "--wait=true", "--timeout=60s")
    isvc = _isvc(cluster, namespace, "shared")
    assert [a["name"] for a in isvc["spec"]["adapters"]] == ["first"]

    def ready_with_first_only():
        obj = _isvc(cluster, namespace, "shared")
        st = obj.get("status") or {}
        return (st.get("observedGeneration") == obj["metadata"]["generation"] and st.get("phase") == "Ready"
                and "second" not in st.get("servedModels", []) and st)
    wait_for(ready_with_first_only, timeout=120, what="the shared server Ready with the remaining adapter")

    # The job that created the server and was the last one in it: the server goes with it.
    cluster.kubectl("delete", "ftj", "first", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(lambda: _isvc(cluster, namespace, "shared") is None, timeout=60, what="the emptied server to go")


def test_ttl_after_finished_keeps_a_job_while_it_is_served(cluster, namespace, operator):
    """#14 item 5: ttlSecondsAfterFinished with deploy deleted the job (and a Delete-policy claim)
    while its InferenceService served it."""
    apply(cluster, namespace, ftj("served", deploy={"gpus": 1}, ttlSecondsAfterFinished=1,
                                  storage={"reclaimPolicy": "Delete"}))
    _deployed(cluster, namespace, "served", "served")
    wait_for(lambda: "KeptWhileServed" in {e["reason"] for e in events(cluster, namespace, "served")},
             timeout=60, what="the KeptWhileServed event")
    assert status(cluster, namespace, "served")["phase"] == "Succeeded"
    assert cluster.kubectl("get", "pvc", "served-workspace", "-n", namespace, check=False).returncode == 0
    # The server lets go: the job expires.
    cluster.kubectl("delete", "inferenceservice", "served", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(lambda: cluster.kubectl("get", "ftj", "served", "-n", namespace, check=False).returncode != 0,
             timeout=60, what="the job to expire once nothing serves it")


def test_a_job_kueue_still_queues_has_no_start_time(cluster, namespace, operator):
    """#14 item 8: startTime was set while Kueue still queued the job. No Kueue runs here: the
    test unsuspends the Job the way Kueue admits a workload."""
    apply(cluster, namespace, ftj("queued", resources={"queueName": "team-a", "nodeSelector": NOWHERE}))
    s = wait_phase(cluster, namespace, "queued", "Pending", reason="Queued")
    assert "startTime" not in s
    (job,) = trainer_jobs(cluster, namespace, "queued")
    assert job["spec"]["suspend"] is True
    cluster.kubectl("patch", "job", job["metadata"]["name"], "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"suspend":false}}')
    s = wait_for(lambda: status(cluster, namespace, "queued").get("startTime") and status(cluster, namespace, "queued"),
                 timeout=60, what="startTime once the Job runs")
    started = get_json(cluster, "job", job["metadata"]["name"], "-n", namespace)["status"]["startTime"]
    assert s["startTime"] == started


def test_a_spec_edited_while_kueue_queues_the_job_rebuilds_its_trainer_job(cluster, namespace, operator):
    """An edit CEL accepts (training has not started) must reach the trainer: the Job was built
    at creation and kept, so a queued job ran its old spec. No Kueue runs here: the Job stays
    suspended as Kueue keeps it until admission, and the test unsuspends it as Kueue admits."""
    apply(cluster, namespace, ftj("edited", resources={"queueName": "team-a", "nodeSelector": NOWHERE}))
    wait_phase(cluster, namespace, "edited", "Pending", reason="Queued")
    (first,) = wait_for(lambda: trainer_jobs(cluster, namespace, "edited"), timeout=90, what="the trainer Job")
    assert trainer_config_of(first)["training"]["learningRate"] != 1e-3
    # Nothing is compared before training: no review ConfigMap yet (it comes with the comparison Job).
    assert cluster.kubectl("get", "cm", "edited-review", "-n", namespace, check=False).returncode != 0

    apply(cluster, namespace, ftj("edited", resources={"queueName": "team-a", "nodeSelector": NOWHERE,
                                                       "image": "finetune-trainer:edited"},
                                  training={"precision": "fp32", "learningRate": 1e-3}))

    def rebuilt():
        jobs = [j for j in trainer_jobs(cluster, namespace, "edited") if j["metadata"]["uid"] != first["metadata"]["uid"]]
        return jobs and jobs[0]
    again = wait_for(rebuilt, timeout=90, what="the trainer Job built again from the edited spec")
    assert trainer_config_of(again)["training"]["learningRate"] == 1e-3
    assert again["spec"]["template"]["spec"]["containers"][0]["image"] == "finetune-trainer:edited"
    assert again["spec"]["suspend"] is True  # still Kueue's to admit
    assert [j["metadata"]["uid"] for j in trainer_jobs(cluster, namespace, "edited")] == [again["metadata"]["uid"]]
    wait_for(lambda: "Rebuilding" in {e["reason"] for e in events(cluster, namespace, "edited")},
             timeout=30, what="the Rebuilding event")
    wait_for(lambda: status(cluster, namespace, "edited").get("trainerImage") == "finetune-trainer:edited",
             timeout=30, what="status.trainerImage of the edited spec")

    # Admitted (as Kueue does): training starts, and from then on CEL refuses such edits.
    cluster.kubectl("patch", "job", again["metadata"]["name"], "-n", namespace, "--type=merge",
                    "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: status(cluster, namespace, "edited").get("startTime"), timeout=60, what="startTime")
    refused = cluster.kubectl("patch", "ftj", "edited", "-n", namespace, "--type=merge",
                              "-p", '{"spec":{"training":{"learningRate":0.002}}}', check=False)
    assert refused.returncode != 0 and "spec.training is immutable once training started" in refused.stderr
    assert [j["metadata"]["uid"] for j in trainer_jobs(cluster, namespace, "edited")] == [again["metadata"]["uid"]]


def test_a_config_too_large_for_the_pod_template_gets_a_config_map_of_its_own(cluster, namespace, operator):
    """A config past 192 KiB (long evaluation prompts) cannot travel in the pod template's
    annotations (256 KiB in all): the Job mounts a ConfigMap owned by the job instead."""
    prompts = [{"prompt": f"{i} " + "p" * 6000} for i in range(40)]
    apply(cluster, namespace, ftj("wordy", resources={"nodeSelector": NOWHERE}, evaluation={"prompts": prompts}))
    (job,) = wait_for(lambda: trainer_jobs(cluster, namespace, "wordy"), timeout=90, what="the trainer Job")
    template = job["spec"]["template"]
    assert "finetune.dev/trainer-config" not in template["metadata"]["annotations"]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == "wordy-trainer-config"
    cm = get_json(cluster, "cm", "wordy-trainer-config", "-n", namespace)
    assert [r["uid"] for r in cm["metadata"]["ownerReferences"]] == [
        get_json(cluster, "ftj", "wordy", "-n", namespace)["metadata"]["uid"]]
    assert len(json.loads(cm["data"]["config.json"])["evaluation"]["prompts"]) == 40
