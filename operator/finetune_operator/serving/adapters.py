"""LoRA adapters loaded into running vLLM replicas at run time, without restarting them.

vLLM starts with `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and no
`--lora-modules`: the pod template names no adapter, so adding, removing or replacing an
adapter changes no template and rolls nothing out. Only the base model, vLLM's arguments,
resources and the volumes (the claims adapters are read from) do.

On every reconciliation the operator asks each ready replica of the current revision
`GET /v1/models` and makes it serve exactly the spec's adapters:
`POST /v1/unload_lora_adapter` for names it should not serve, `POST /v1/load_lora_adapter`
for missing ones, and `load_inplace` for a name whose version changed (a FineTuneJob
recreated under the same name writes to the same path: the version is the job's uid, or the
path for `spec.adapters[].path`). What each replica loaded, with its version, is kept in
`status.replicaAdapters`, so an operator restart does not reload everything.

A pod that restarts (a new container, or a new replica after scale-out or a rollout) comes
up with no adapter: its readiness turning True is a pod event, which reconciles and loads
them (about a second for a small adapter). Until then the Service may route a request
for an adapter to it and get a 404; `status.servedModels` lists only what every ready
replica serves, so clients and the FineTuneJob's `Deployed` never see a name that is
not served everywhere. A failed load is retried with backoff (the reconciliation raises
`AdapterSyncError` after writing the status).

Pods on a simulated node (kwok, annotation `kwok.x-k8s.io/node`) run no container: there is
nothing to ask, so such a replica is reported as serving the spec's adapters (`simulated`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Protocol

from finetune_api.models import FineTuneJob, InferenceService

from finetune_operator.serving.common import PORT, REVISION_ANNOTATION, served_model_name

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
SIMULATED_NODE_ANNOTATION = "kwok.x-k8s.io/node"
MODELS_TIMEOUT = 5.0
LOAD_TIMEOUT = 60.0


class AdapterSyncError(Exception):
    """Some replica could not be made to serve the spec's adapters (retried with backoff)."""


@dataclass(frozen=True)
class Want:
    """An adapter the spec asks for: where the pod reads it, and which version it is."""

    path: str
    version: str


@dataclass
class Replica:
    """What one ready pod serves."""

    pod: str
    loaded: dict[str, str] = field(default_factory=dict)  # adapter name -> version
    error: Optional[str] = None
    simulated: bool = False

    def to_status(self) -> dict:
        out: dict = {"pod": self.pod, "adapters": [{"name": n, "version": v} for n, v in sorted(self.loaded.items())]}
        if self.error:
            out["error"] = self.error
        if self.simulated:
            out["simulated"] = True
        return out


class Server(Protocol):
    """vLLM's runtime LoRA API on one replica."""

    def adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> path (`/v1/models` entries that have a parent)."""

    def load(self, name: str, path: str, inplace: bool) -> None: ...

    def unload(self, name: str) -> None: ...


class VLLMError(Exception):
    pass


class HTTPServer:
    """A replica reached over HTTP at `base` (http://<pod IP>:8000)."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def _call(self, path: str, body: Optional[dict], timeout: float) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}{path}", data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            raise VLLMError(f"{path}: HTTP {e.code}: {_message(detail)}") from None
        except OSError as e:
            raise VLLMError(f"{path}: {getattr(e, 'reason', e)}") from None

    def post(self, path: str, body: dict, timeout: float = LOAD_TIMEOUT) -> dict:
        return json.loads(self._call(path, body, timeout) or b"{}")

    def adapters(self) -> dict[str, str]:
        data = json.loads(self._call("/v1/models", None, MODELS_TIMEOUT))
        return {m["id"]: m.get("root") or "" for m in data.get("data", []) if m.get("parent")}

    def load(self, name: str, path: str, inplace: bool) -> None:
        self._call("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path, "load_inplace": inplace},
                   LOAD_TIMEOUT)

    def unload(self, name: str) -> None:
        self._call("/v1/unload_lora_adapter", {"lora_name": name}, LOAD_TIMEOUT)


def _message(detail: str) -> str:
    try:
        body = json.loads(detail)
    except ValueError:
        return detail
    err = body.get("error", body) if isinstance(body, dict) else body
    return str(err.get("message", err) if isinstance(err, dict) else err)


# --- what to serve (pure) ---------------------------------------------------------------------


def wanted(isvc: InferenceService, jobs: Mapping[str, FineTuneJob]) -> dict[str, Want]:
    """The spec's adapters as the pod reads them: name -> (path in the pod, version)."""
    from finetune_operator.serving.deployment import adapter_paths

    out = {}
    for adapter, path in zip(isvc.spec.adapters, adapter_paths(isvc, jobs)):
        ref = adapter.fine_tune_job_ref
        version = (jobs[ref.name].metadata.uid or ref.name) if ref else path
        out[adapter.name] = Want(path, version)
    return out


def sync_replica(pod: str, server: Server, want: Mapping[str, Want], recorded: Mapping[str, str],
                 change: bool = True) -> Replica:
    """Make one replica serve exactly `want` (`change` False: only look). `recorded` is the
    version per name this operator loaded there before (from the status)."""
    try:
        present = server.adapters()
    except VLLMError as e:
        return Replica(pod, error=f"cannot list adapters: {e}")
    loaded = {name: (recorded.get(name) or "") for name in present}
    if not change:
        return Replica(pod, loaded)
    errors = []
    for name in sorted(set(present) - set(want)):
        try:
            server.unload(name)
            loaded.pop(name)
        except VLLMError as e:
            errors.append(f"unloading {name}: {e}")
    for name, w in want.items():
        if name in present and present[name] == w.path and loaded.get(name) == w.version:
            continue
        try:
            server.load(name, w.path, inplace=name in present)
            loaded[name] = w.version
        except VLLMError as e:
            errors.append(f"loading {name} from {w.path}: {e}")
    return Replica(pod, loaded, "; ".join(errors) or None)


def recorded_versions(status: Optional[dict]) -> dict[str, dict[str, str]]:
    """pod -> {adapter name: version} from a previous status.replicaAdapters."""
    out = {}
    for entry in (status or {}).get("replicaAdapters") or []:
        out[entry.get("pod", "")] = {a["name"]: a.get("version", "") for a in entry.get("adapters") or []}
    return out


def served(isvc: InferenceService, replicas: list[Replica]) -> list[str]:
    """status.servedModels: the base model's name and each spec adapter that every ready
    replica serves (every adapter when no replica is ready: none contradicts the spec)."""
    names = [a.name for a in isvc.spec.adapters]
    return [served_model_name(isvc)] + [n for n in names if all(n in r.loaded for r in replicas)]


def pending(want: Mapping[str, Want], replicas: list[Replica]) -> list[str]:
    """What keeps the replicas from serving exactly `want` (empty: converged)."""
    out = []
    for r in replicas:
        if r.error:
            out.append(f"pod {r.pod}: {r.error}")
            continue
        missing = [n for n, w in want.items() if r.loaded.get(n) != w.version]
        extra = sorted(set(r.loaded) - set(want))
        if missing or extra:
            out.append(f"pod {r.pod}: " + ", ".join(
                ([f"loading {', '.join(missing)}"] if missing else []) + ([f"unloading {', '.join(extra)}"]
                                                                          if extra else [])))
    return out


# --- the replicas (what the handler calls) ----------------------------------------------------


def pod_ready(pod: dict) -> bool:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def sync(isvc: InferenceService, want: Optional[Mapping[str, Want]], pods: list[dict], revision: Optional[str],
         previous_status: Optional[dict], simulated: Callable[[str], bool],
         server_for: Callable[[str], Server] = lambda ip: HTTPServer(f"http://{ip}:{PORT}")) -> list[Replica]:
    """Every ready pod's adapters; those of the current revision are first made to serve
    `want` (None: the spec cannot be served now, so only look)."""
    records = recorded_versions(previous_status)
    replicas = []
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        if not pod_ready(pod):
            continue
        name = pod["metadata"]["name"]
        if simulated(pod.get("spec", {}).get("nodeName") or ""):
            replicas.append(Replica(name, {n: w.version for n, w in (want or {}).items()}, simulated=True))
            continue
        ip = pod.get("status", {}).get("podIP")
        if not ip:
            replicas.append(Replica(name, error="the pod has no IP yet"))
            continue
        current = (pod["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION) == revision
        replicas.append(sync_replica(name, server_for(ip), want or {}, records.get(name, {}),
                                     change=want is not None and current))
    return replicas
