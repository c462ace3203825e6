"""The local node (a kubelet stand-in) probes a container as a kubelet does: at the startup
probe's period until it first passes, then at the readiness probe's (#14: the vLLM pod's
startup probe runs every second, so the pod is Ready within a second of vLLM answering)."""

from __future__ import annotations

from types import SimpleNamespace

from kubernetes import client

from finetune_devcluster import localnode


def _probe(period: int) -> client.V1Probe:
    return client.V1Probe(http_get=client.V1HTTPGetAction(path="/health", port="http"), period_seconds=period)


class _Proc:
    """Running for `polls` checks, then exited."""

    def __init__(self, polls: int) -> None:
        self.left = polls

    def poll(self):
        self.left -= 1
        return None if self.left >= 0 else 0


def test_the_startup_probe_period_until_first_ready_then_the_readiness_period(monkeypatch):
    answers = iter([False, False, False, True, True, True])
    sleeps: list[float] = []
    patched: list[bool] = []

    class _Response:
        status = 200

    def urlopen(url, timeout):
        assert url == "http://127.0.0.1:8000/health"
        if not next(answers):
            raise ConnectionRefusedError("not listening yet")
        return _Response()

    monkeypatch.setattr(localnode.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(localnode.time, "sleep", sleeps.append)
    runner = SimpleNamespace(ready={"vllm": False}, _container_status=lambda *a: None)
    runner._patch_status = lambda: patched.append(runner.ready["vllm"])
    container = client.V1Container(name="vllm", ports=[client.V1ContainerPort(name="http", container_port=8000)],
                                   startup_probe=_probe(1), readiness_probe=_probe(5))
    localnode.PodRunner._probe_until_exit(runner, container, _Proc(6), 0, "2026-01-01T00:00:00Z")
    assert sleeps == [1, 1, 1, 2, 2, 2]  # 1 s (startup) while not up; the readiness period (5, at most 2 here) after
    assert patched == [True]  # Ready reported once, on the first passing probe


def test_without_a_startup_probe_the_readiness_period_throughout(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(localnode.urllib.request, "urlopen",
                        lambda url, timeout: (_ for _ in ()).throw(ConnectionRefusedError()))
    monkeypatch.setattr(localnode.time, "sleep", sleeps.append)
    runner = SimpleNamespace(ready={"c": False}, _container_status=lambda *a: None, _patch_status=lambda: None)
    container = client.V1Container(name="c", ports=[client.V1ContainerPort(name="http", container_port=8000)],
                                   readiness_probe=_probe(5))
    localnode.PodRunner._probe_until_exit(runner, container, _Proc(3), 0, "2026-01-01T00:00:00Z")
    assert sleeps == [2, 2, 2]
