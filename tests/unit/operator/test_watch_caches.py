"""#14: a status refresh reads the job, its Jobs and its pods from the watch caches (kopf
indexes), makes no read request, writes only what changed, and writes onto the version it
read (a 409 reads afresh and goes again)."""

from __future__ import annotations

import copy

import pytest
from kubernetes.client.rest import ApiException

from finetune_operator import cache, kube
from finetune_operator.handlers import finetunejob, records

NS, NAME, UID = "ml", "bot", "ftj-uid"
ADMITTED = [{"type": "Admitted", "status": "True", "reason": "Admitted", "message": "",
             "lastTransitionTime": "2025-01-01T10:00:00Z"}]


def ftj(rv: int, uid: str = UID, **status) -> dict:
    status.setdefault("phase", "Pending")
    status.setdefault("conditions", ADMITTED)
    status.setdefault("trainerJob", f"{NAME}-trainer")
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": NAME, "namespace": NS, "uid": uid, "resourceVersion": str(rv),
                         "creationTimestamp": "2025-01-01T10:00:00Z", "generation": 1,
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"model": {"source": "org/m"}, "dataset": {"source": "pvc://x/d.jsonl"}},
            "status": status}


TRAINER = {"metadata": {"name": f"{NAME}-trainer", "namespace": NS, "uid": "job-uid",
                        "labels": {"finetune.dev/finetunejob": NAME},
                        "ownerReferences": [{"kind": "FineTuneJob", "name": NAME, "uid": UID}]},
           "spec": {"suspend": False, "template": {"spec": {"containers": [{"image": "img"}]}}},
           "status": {"startTime": "2025-01-01T10:01:00Z", "active": 1}}
POD = {"metadata": {"name": "p0", "namespace": NS, "uid": "pod-uid", "creationTimestamp": "2025-01-01T10:01:00Z",
                    "labels": {cache.CONTROLLER_UID: "job-uid"}},
       "spec": {"containers": [{"name": "trainer", "resources": {}}]},
       "status": {"phase": "Running", "containerStatuses": [
           {"name": "trainer", "image": "img", "state": {"running": {"startedAt": "2025-01-01T10:02:00Z"}}}]}}


ORIGINAL_OBSERVE = records.observe


class FakeIndex(dict):
    """kopf.Index's shape: key -> a collection of values."""

    def put(self, key, value):
        self[key] = [value]


@pytest.fixture
def caches():
    indexes = {"finetunejobs": FakeIndex(), "jobs": FakeIndex(), "trainer_pods": FakeIndex()}
    cache.reset()
    cache.bind(**indexes)
    yield indexes
    cache.reset()


@pytest.fixture
def api(monkeypatch):
    """No read may reach the API server; status writes are recorded and answered like the
    server would (the merged object with the next resourceVersion)."""
    calls = {"reads": [], "status": [], "conflicts": 0}
    state = {}

    def no_read(*args, **kwargs):
        calls["reads"].append(args)
        return copy.deepcopy(state["fresh"]) if "fresh" in state else None

    def patch_status(plural, namespace, name, status, resource_version=None):
        if calls["conflicts"]:
            calls["conflicts"] -= 1
            raise ApiException(status=409, reason="Conflict")
        calls["status"].append((status, resource_version))
        written = copy.deepcopy(state["current"])
        written["status"] = {**written["status"], **status}
        written["metadata"]["resourceVersion"] = str(int(written["metadata"]["resourceVersion"]) + 1)
        state["current"] = written
        return copy.deepcopy(written)

    monkeypatch.setattr(kube, "read_own", no_read)
    monkeypatch.setattr(kube, "read", no_read)
    monkeypatch.setattr(kube, "core", lambda: pytest.fail("the pods must come from the cache"))
    monkeypatch.setattr(kube, "patch_status", patch_status)
    monkeypatch.setattr(records, "transition", lambda *a, **k: None)
    monkeypatch.setattr(records, "observe", lambda *a, **k: None)
    calls["state"] = state
    return calls


def test_a_refresh_reads_nothing_and_writes_onto_the_version_it_read(caches, api):
    obj = ftj(10)
    api["state"]["current"] = obj
    caches["finetunejobs"].put((NS, NAME), cache.trim(obj))
    caches["jobs"].put((NS, f"{NAME}-trainer"), TRAINER)
    caches["trainer_pods"].put((NS, "job-uid"), POD)

    finetunejob.refresh_status(NS, NAME)
    assert api["reads"] == []
    (status, rv), = api["status"]
    assert rv == "10" and status["phase"] == "Validating" and status["startTime"] == "2025-01-01T10:01:00Z"

    # The watch has not delivered our write yet: the cache answers with it, so a second
    # refresh of the same state neither reads nor writes.
    finetunejob.refresh_status(NS, NAME)
    assert api["reads"] == [] and len(api["status"]) == 1


def test_a_conflict_reads_the_job_afresh_and_writes_once_more(caches, api):
    stale, fresh = ftj(10), ftj(12)
    api["state"].update(current=fresh, fresh=fresh)
    caches["finetunejobs"].put((NS, NAME), cache.trim(stale))
    caches["jobs"].put((NS, f"{NAME}-trainer"), TRAINER)
    caches["trainer_pods"].put((NS, "job-uid"), POD)
    api["conflicts"] = 1

    finetunejob.refresh_status(NS, NAME)
    assert len(api["reads"]) == 1  # the one fresh read after the 409
    (status, rv), = api["status"]
    assert rv == "12" and status["phase"] == "Validating"


def test_the_newer_of_the_watched_copy_and_our_write_wins(caches):
    reads = []

    def read():
        reads.append(1)
        return None

    caches["finetunejobs"].put((NS, NAME), cache.trim(ftj(5)))
    assert cache.finetunejob(NS, NAME, read)["metadata"]["resourceVersion"] == "5"
    cache.remember(ftj(7, phase="Training"))
    assert cache.finetunejob(NS, NAME, read)["status"]["phase"] == "Training"
    # the watch catches up (and overtakes: a user's edit): the watched copy wins, ours is dropped
    caches["finetunejobs"].put((NS, NAME), cache.trim(ftj(9, phase="Training")))
    assert cache.finetunejob(NS, NAME, read)["metadata"]["resourceVersion"] == "9"
    caches["finetunejobs"].put((NS, NAME), cache.trim(ftj(8)))
    assert cache.finetunejob(NS, NAME, read)["metadata"]["resourceVersion"] == "8"  # nothing of ours left
    # a job re-created under the same name (another uid) never gets the old one's write
    cache.remember(ftj(20, phase="Succeeded"))
    caches["finetunejobs"].put((NS, NAME), cache.trim(ftj(3, uid="new-uid")))
    assert cache.finetunejob(NS, NAME, read)["metadata"]["uid"] == "new-uid"
    assert reads == []
    # not in the watch (gone, or not seen yet): read it
    assert cache.finetunejob(NS, "other", read) is None and reads == [1]


def test_cached_copies_drop_managed_fields_and_are_detached():
    body = ftj(1)
    trimmed = cache.trim(body)
    assert "managedFields" not in trimmed["metadata"] and "managedFields" in body["metadata"]
    trimmed["status"]["phase"] = "Failed"
    assert body["status"]["phase"] == "Pending"
    assert cache.index_trainer_pod(namespace=NS, labels=POD["metadata"]["labels"], body=POD) == \
        {(NS, "job-uid"): cache.trim_pod(POD)}
    assert cache.index_trainer_pod(namespace=NS, labels={}, body=POD) == {}


def test_cached_jobs_and_pods_keep_only_what_a_refresh_reads():
    """The cache holds two Jobs and their pods per FineTuneJob: their pod templates (env,
    volumes, arguments) are most of their bytes and never read. What a refresh derives from a
    trimmed copy is what it derives from the whole object."""
    import datetime as dt
    import json

    from finetune_api.models import FineTuneJob
    from finetune_operator.status import derive

    pod = copy.deepcopy(POD)
    pod["spec"]["containers"][0].update(resources={"limits": {"nvidia.com/gpu": "2"}},
                                         env=[{"name": "X", "value": "y" * 4000}], image="img")
    pod["spec"]["volumes"] = [{"name": "v", "emptyDir": {}}] * 20
    pod["spec"]["nodeName"] = "gpu-1"
    job = copy.deepcopy(TRAINER)
    job["spec"]["template"]["spec"]["containers"][0].update(args=["--x"] * 500, name="trainer")
    small_pod, small_job = cache.trim_pod(pod), cache.trim_job(job)
    assert len(json.dumps(small_pod)) < len(json.dumps(pod)) / 4
    assert len(json.dumps(small_job)) < len(json.dumps(job)) / 4
    assert small_job["spec"]["template"]["spec"]["containers"][0]["image"] == "img"
    now = dt.datetime(2025, 1, 1, 11, 0, tzinfo=dt.timezone.utc)
    ftjob = FineTuneJob.from_resource(ftj(1))
    assert derive(ftjob, small_job, [small_pod], now=now) == derive(ftjob, job, [pod], now=now)


def test_without_bound_indexes_every_read_goes_to_the_api():
    cache.reset()
    assert cache.job(NS, "j", lambda: {"read": True}) == {"read": True}
    assert cache.trainer_pods(NS, "u", lambda: [POD]) == [POD]
    assert cache.finetunejob(NS, NAME, lambda: "fetched") == "fetched"


def test_a_job_just_created_is_seen_before_the_watch_brings_it(caches):
    created = {**TRAINER, "kind": "Job", "metadata": {**TRAINER["metadata"], "resourceVersion": "4"}}
    assert cache.job(NS, f"{NAME}-trainer", lambda: pytest.fail("no read")) is None
    cache.remember(created)
    assert cache.job(NS, f"{NAME}-trainer", lambda: pytest.fail("no read"))["metadata"]["uid"] == "job-uid"
    caches["jobs"].put((NS, f"{NAME}-trainer"), {**created, "metadata": {**created["metadata"], "resourceVersion": "6"}})
    assert cache.job(NS, f"{NAME}-trainer", lambda: None)["metadata"]["resourceVersion"] == "6"
    cache.remember(created)
    cache.forget(NS, NAME)  # the job is gone: so are our writes of its Jobs
    del caches["jobs"][(NS, f"{NAME}-trainer")]
    assert cache.job(NS, f"{NAME}-trainer", lambda: pytest.fail("no read")) is None


def test_growing_gpu_hours_alone_are_written_once_a_minute_and_counted_once(caches, api, monkeypatch):
    """A running job's GPU hours change at every refresh; writing them each time was most of
    the operator's status writes. The metric must still count each GPU second once."""
    from finetune_operator import metrics

    monkeypatch.setattr(records, "observe", ORIGINAL_OBSERVE)
    monkeypatch.setattr(finetunejob, "_patch_metadata", lambda job, metadata: None)  # the GPU-seconds record
    gpu_pod = copy.deepcopy(POD)
    gpu_pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    obj = ftj(10)
    api["state"]["current"] = obj
    caches["finetunejobs"].put((NS, NAME), cache.trim(obj))
    caches["jobs"].put((NS, f"{NAME}-trainer"), TRAINER)
    caches["trainer_pods"].put((NS, "job-uid"), gpu_pod)
    clock = {"now": 0.0}
    monkeypatch.setattr(finetunejob.time, "monotonic", lambda: clock["now"])
    import datetime as dt
    start = dt.datetime(2025, 1, 1, 11, 0, tzinfo=dt.timezone.utc)
    monkeypatch.setattr(finetunejob, "_now", lambda: start + dt.timedelta(seconds=clock["now"]))
    counted = metrics.gpu_seconds._value.get()

    finetunejob.refresh_status(NS, NAME)  # the phase changes: written
    first = api["status"][-1][0]["gpuHours"]
    clock["now"] = 30.0
    finetunejob.refresh_status(NS, NAME)  # only GPU hours moved, 30 s later: not written
    assert len(api["status"]) == 1
    clock["now"] = 61.0
    finetunejob.refresh_status(NS, NAME)  # a minute on: written
    assert len(api["status"]) == 2 and api["status"][-1][0]["gpuHours"] > first
    total = api["status"][-1][0]["gpuHours"] * 3600
    assert metrics.gpu_seconds._value.get() - counted == pytest.approx(total, abs=1.0)


def test_a_job_gone_is_forgotten_by_the_resync_pass(caches, api, monkeypatch):
    """Jobs without a finalizer leave without a deletion handler: what the operator keeps in
    memory about them (phase gauge, GPU hours counted, diff base, writes) goes on the next
    resync pass, and a job of that name created again starts counting GPU hours from zero."""
    from finetune_operator import settings
    finetunejob._refreshed_at.clear()  # refreshes other tests made: not this test's jobs

    monkeypatch.setattr(records, "observe", ORIGINAL_OBSERVE)
    obj = ftj(10)
    api["state"]["current"] = obj
    caches["finetunejobs"].put((NS, NAME), cache.trim(obj))
    caches["jobs"].put((NS, f"{NAME}-trainer"), TRAINER)
    finetunejob.refresh_status(NS, NAME)
    settings.diffbase.store(body=obj, patch=None, essence={"spec": {}})
    assert (NS, NAME) in records.known() and settings.diffbase.fetch(body=obj) is not None

    assert finetunejob.forget_gone() == 0  # still there: nothing forgotten
    assert (NS, NAME) in records.known()
    del caches["finetunejobs"][(NS, NAME)]
    assert finetunejob.forget_gone() == 1
    assert (NS, NAME) not in records.known() and (NS, NAME) not in finetunejob._status_written
    assert settings.diffbase.fetch(body=obj) is None


def test_gpu_hours_counted_belong_to_the_uid_that_ran_them(monkeypatch):
    """A job deleted and created again under its name, before the resync pass forgot the old
    one: the new job's GPU hours are counted from zero, not from the old job's total."""
    from finetune_api.models import FineTuneJob
    from finetune_operator import metrics
    from finetune_operator.status import Observation, Phase
    import datetime as dt

    now = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
    records.forget(NS, NAME)
    before = metrics.gpu_seconds._value.get()
    old = FineTuneJob.from_resource(ftj(1, uid="old"))
    ORIGINAL_OBSERVE(old, Observation(phase=Phase.TRAINING, reason="r", message="m", gpu_seconds={"p": 7200.0}), ftj(1, uid="old"), now)
    new = FineTuneJob.from_resource(ftj(2, uid="new"))
    ORIGINAL_OBSERVE(new, Observation(phase=Phase.TRAINING, reason="r", message="m", gpu_seconds={"q": 3600.0}), ftj(2, uid="new"), now)
    assert metrics.gpu_seconds._value.get() - before == pytest.approx(3.0 * 3600)
    records.forget(NS, NAME)


def test_what_was_done_is_told_in_the_transitions_event_not_in_events_of_its_own(monkeypatch):
    """Every Event is a request per job: creating the trainer Job and entering Pending is one
    Event (it was two), and a note without a transition is still told."""
    posted = []
    monkeypatch.setattr(records.kopf, "event", lambda body, **kw: posted.append(kw))
    body = ftj(1)
    records.transition(body, None, "Pending", "Created", "waiting for the pod",
                       [("TrainerJobCreated", "created trainer Job bot-trainer")])
    assert len(posted) == 1 and posted[0]["reason"] == "Pending"
    assert "TrainerJobCreated: created trainer Job bot-trainer" in posted[0]["message"]
    records.transition(body, "Pending", "Pending", "Created", "waiting", [("TrainerJobCreated", "again")])
    assert len(posted) == 2 and posted[1]["reason"] == "TrainerJobCreated"


def test_gpu_seconds_per_pod_are_kept_in_the_status_patch_and_a_deleted_pod_keeps_counting(caches, api, monkeypatch):
    """They were an annotation, written with a metadata patch of its own when a pod started:
    one more request per job. Now they go into the status patch that writes gpuHours."""
    monkeypatch.setattr(finetunejob, "_patch_metadata", lambda *a, **k: pytest.fail("no metadata patch"))
    gpu_pod = copy.deepcopy(POD)
    gpu_pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    obj = ftj(10, gpuSecondsByPod={"pod-gone": 1800.0})
    api["state"]["current"] = obj
    caches["finetunejobs"].put((NS, NAME), cache.trim(obj))
    caches["jobs"].put((NS, f"{NAME}-trainer"), TRAINER)
    caches["trainer_pods"].put((NS, "job-uid"), gpu_pod)
    import datetime as dt
    monkeypatch.setattr(finetunejob, "_now", lambda: dt.datetime(2025, 1, 1, 11, 2, tzinfo=dt.timezone.utc))
    finetunejob.refresh_status(NS, NAME)
    written = api["status"][-1][0]
    assert written["gpuSecondsByPod"] == {"pod-gone": 1800.0, "pod-uid": 3600.0}
    assert written["gpuHours"] == pytest.approx(1.5)


@pytest.mark.parametrize("queue", [None, "gpu-queue"])
def test_a_trainer_job_no_queue_holds_is_started_in_the_patch_that_names_it(caches, monkeypatch, queue):
    """startTime was a status patch of its own, a moment after the one naming the Job (one
    request per job); a Job Kueue still queues has not started, so it gets none."""
    obj = ftj(3, phase=None, conditions=[], trainerJob=None)
    obj["spec"]["resources"] = {"queueName": queue} if queue else {}
    obj["status"] = {}
    job = finetunejob.FineTuneJob.from_resource(obj)
    created = dict(TRAINER, metadata=dict(TRAINER["metadata"], creationTimestamp="2025-01-01T10:00:05Z"))
    monkeypatch.setattr(kube, "create", lambda *a, **k: copy.deepcopy(created))
    monkeypatch.setattr(kube, "batch", lambda: type("Batch", (), {"create_namespaced_job": None,
                                                                  "read_namespaced_job": None})())
    monkeypatch.setattr(finetunejob, "_suspend_queued", lambda *a, **k: None)
    pending, notes = {}, []
    finetunejob._ensure_trainer_job(job, obj, pending, notes)
    assert pending["trainerJob"] == f"{NAME}-trainer" and notes[0][0] == "TrainerJobCreated"
    assert pending.get("startTime") == (None if queue else "2025-01-01T10:00:05Z")
    # and its first attempt, which its pod's arrival then leaves as it is (no patch of its own)
    assert pending.get("attempts") == (None if queue else 1)


def test_a_job_deleted_before_the_watch_replaced_our_write_is_not_taken_for_present(caches, monkeypatch):
    """A FineTuneJob deleted and created again under its name at once (no finalizer holds it):
    the old job's trainer Job, remembered when we created it, was deleted before the watch's
    copy replaced our write. The new job then waited for good for a Job that was gone
    ("still belongs to an earlier FineTuneJob"). Its DELETED event drops our write; so does
    time, when the watch never brought it."""
    job = dict(copy.deepcopy(TRAINER), kind="Job", apiVersion="batch/v1")
    job["metadata"]["resourceVersion"] = "5"
    cache.remember(job)
    assert cache.job(NS, f"{NAME}-trainer", lambda: None) is not None  # just created: seen at once
    finetunejob.on_trainer_job_event(job, refresh=lambda *a: None, deleted=True)
    assert cache.job(NS, f"{NAME}-trainer", lambda: None) is None

    cache.remember(job)
    clock = {"now": cache.time.monotonic()}
    monkeypatch.setattr(cache.time, "monotonic", lambda: clock["now"])
    cache.remember(job)
    clock["now"] += cache.UNSEEN_WRITE_SECONDS + 1
    assert cache.job(NS, f"{NAME}-trainer", lambda: None) is None


def test_admission_reads_an_existing_claim_from_the_watch_and_asks_only_about_one_it_has_not_seen(
        caches, monkeypatch):
    """Many jobs name one claim: admission's GET of it for each new job was one request of 19
    per job (#14). A claim the watch has shown is not read again; one it has not (created a
    moment ago, or missing) is, so a job is never refused for a claim that is there."""
    from finetune_api.models import FineTuneJob
    from finetune_operator.handlers import facts

    gets = []

    def request(method, path, **_):
        gets.append(path)
        return {"metadata": {"name": path.rsplit("/", 1)[-1]}} if path.endswith("/fresh") else None

    monkeypatch.setattr(kube, "request", request)
    monkeypatch.setattr(facts, "node_gpus", lambda: [8])
    caches["claims"] = FakeIndex()
    cache.bind(claims=caches["claims"])
    body = ftj(1)
    body["spec"] = {**body["spec"], "storage": {"existingClaim": "shared"}, "dataset": {"source": "pvc://fresh/d.jsonl"}}
    job = FineTuneJob.from_resource(body)
    caches["claims"].put((NS, "shared"), cache.index_claim(namespace=NS, name="shared")[(NS, "shared")])

    assert facts.gather(job).claims == {"shared", "fresh"}
    assert gets == [f"/api/v1/namespaces/{NS}/persistentvolumeclaims/fresh"]  # not seen yet: asked

    gets.clear()
    body["spec"]["dataset"] = {"source": "pvc://missing/d.jsonl"}
    assert facts.gather(FineTuneJob.from_resource(body)).claims == {"shared"}  # missing stays missing
    assert gets == [f"/api/v1/namespaces/{NS}/persistentvolumeclaims/missing"]


def test_the_trainer_pods_arrival_writes_nothing_once_the_jobs_creation_counted_its_attempt(caches, api):
    """#14: attempts went 0 -> 1 when the Job controller created the pod, a status patch of its
    own per job. The patch that names the Job counts the first attempt; the pod then changes
    nothing the status shows until it runs."""
    waiting = {**POD, "status": {"phase": "Pending"}}
    obj = ftj(10, attempts=1)
    api["state"]["current"] = obj
    caches["finetunejobs"].put((NS, NAME), cache.trim(obj))
    caches["jobs"].put((NS, f"{NAME}-trainer"), TRAINER)
    finetunejob.refresh_status(NS, NAME)  # the Job alone: Pending, Starting
    assert [s.get("attempts") for s, _ in api["status"]] == [None]  # the conditions; attempts as they were
    caches["trainer_pods"].put((NS, "job-uid"), waiting)
    finetunejob.refresh_status(NS, NAME)
    assert len(api["status"]) == 1
    caches["trainer_pods"].put((NS, "job-uid"), POD)  # running: Validating
    finetunejob.refresh_status(NS, NAME)
    assert len(api["status"]) == 2 and api["status"][-1][0]["phase"] == "Validating"
    # without the first attempt counted at creation, the pod's arrival is a write of its own
    api["status"].clear()
    cache.reset()
    cache.bind(**caches)
    obj = ftj(20, attempts=0)
    api["state"]["current"] = obj
    caches["finetunejobs"].put((NS, NAME), cache.trim(obj))
    caches["trainer_pods"].pop((NS, "job-uid"))
    finetunejob.refresh_status(NS, NAME)
    caches["trainer_pods"].put((NS, "job-uid"), waiting)
    finetunejob.refresh_status(NS, NAME)
    assert [s.get("attempts") for s, _ in api["status"]] == [None, 1]
