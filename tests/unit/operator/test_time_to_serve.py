"""#14 benchmark "training done -> InferenceService Ready: operator overhead <= 5 s": what the
operator does between vLLM answering and the job being Succeeded (bench/bench_time_to_serve.py
measures it on the local control plane)."""

from __future__ import annotations

import copy

from finetune_operator.serving import deployment, handlers
from tests.fixtures.inference import finetunejob, inferenceservice, parse


def _vllm_container(isvc: dict, *jobs: dict) -> dict:
    parsed, by_name = parse(isvc, *jobs)
    return deployment.build_deployment(parsed, by_name)["spec"]["template"]["spec"]["containers"][0]


def test_the_startup_probe_finds_vllm_up_within_a_second_and_still_allows_a_slow_start():
    c = _vllm_container(inferenceservice(adapters=[{"name": "bot", "fineTuneJobRef": {"name": "bot"}}]),
                        finetunejob("bot"))
    startup = c["startupProbe"]
    # A 10 s period left a server that was up unused for up to 10 s before it could be Ready.
    assert startup["periodSeconds"] == 1
    assert startup["timeoutSeconds"] <= 2
    assert not any(p.get("initialDelaySeconds") for p in (startup, c["readinessProbe"], c["livenessProbe"]))
    # ...while a slow model load (download, weights, CUDA graphs) still has 20 minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1200
    assert deployment.PROGRESS_DEADLINE > startup["periodSeconds"] * startup["failureThreshold"]


class _FakeCluster:
    """The API reads and writes one reconciliation makes, in memory: one InferenceService, its
    FineTuneJobs, no Deployment yet."""

    def __init__(self, isvc: dict, *jobs: dict) -> None:
        self.objects = {("inferenceservices", isvc["metadata"]["name"]): isvc}
        self.objects.update({("finetunejobs", j["metadata"]["name"]): j for j in jobs})
        self.status_writes: list[dict] = []

    def read_own(self, plural, namespace, name, api_client=None):
        return copy.deepcopy(self.objects.get((plural, name)))

    def patch_status(self, plural, namespace, name, status, **_):
        self.status_writes.append(status)
        obj = self.objects[(plural, name)]
        obj["status"] = {**(obj.get("status") or {}), **status}

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(handlers.kube, "read_own", self.read_own)
        monkeypatch.setattr(handlers.kube, "patch_status", self.patch_status)
        monkeypatch.setattr(handlers.kube, "read", lambda *a, **k: None)  # no Deployment, no node
        monkeypatch.setattr(handlers.kube, "apps", lambda: type("Apps", (), {
            "read_namespaced_deployment": None})())
        for name in ("apply", "delete_applied"):
            monkeypatch.setattr(handlers.kube, name, lambda *a, **k: None)
        monkeypatch.setattr(handlers.kube, "crd_exists", lambda name: False)


def _deploying_job(name: str) -> dict:
    job = finetunejob(name, phase="Deploying")
    job["spec"]["deploy"] = {"inferenceService": "support"}
    return job


def test_a_status_write_refreshes_the_jobs_in_deploying_it_serves_at_once(monkeypatch):
    isvc = inferenceservice(adapters=[{"name": "bot", "fineTuneJobRef": {"name": "bot"}},
                                      {"name": "old", "fineTuneJobRef": {"name": "old"}}])
    cluster = _FakeCluster(isvc, _deploying_job("bot"), finetunejob("old", phase="Succeeded"))
    cluster.install(monkeypatch)
    refreshed: list[tuple[str, str]] = []
    monkeypatch.setattr(handlers, "refresh_finetunejob", lambda ns, name: refreshed.append((ns, name)))

    handlers.reconcile("ml", "support")
    assert cluster.status_writes, "the reconciliation wrote no status"
    # The job waiting on this server is refreshed now (it goes Succeeded with the server's
    # Ready), not at the next resync; the one already Succeeded is left alone.
    assert refreshed == [("ml", "bot")]

    refreshed.clear()
    handlers.reconcile("ml", "support")  # nothing changed: no status write, no refresh
    assert len(cluster.status_writes) == 1 and refreshed == []


def test_the_serving_controller_alone_leaves_the_jobs_status_to_theirs(monkeypatch):
    """`kopf run -m finetune_operator.serving.routes` runs no FineTuneJob controller: it does
    not refresh (write) FineTuneJobs' status."""
    cluster = _FakeCluster(inferenceservice(adapters=[{"name": "bot", "fineTuneJobRef": {"name": "bot"}}]),
                           _deploying_job("bot"))
    cluster.install(monkeypatch)
    monkeypatch.setattr(handlers, "refresh_finetunejob", None)
    handlers.reconcile("ml", "support")
    assert cluster.status_writes  # and no error for want of a refresh


def test_the_operator_wires_the_finetunejob_refresh_into_the_serving_controller():
    from finetune_operator import main
    from finetune_operator.handlers import finetunejob

    assert handlers.refresh_finetunejob is finetunejob.refresh_status
    assert main.serving_routes is not None
