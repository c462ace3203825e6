"""Which InferenceServices read which FineTuneJobs, kept from the InferenceServices' own watch
events, so that a FineTuneJob event finds the servers to reconcile without a LIST of every
InferenceService in its namespace (it was 3 LISTs per job in the 1,000-job benchmark)."""

from __future__ import annotations

import threading

from finetune_api.models import InferenceService

from finetune_operator.serving.common import referenced_jobs


class References:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], frozenset[str]] = {}

    def observe(self, event_type: str | None, body: dict) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self._lock:
            if event_type == "DELETED":
                self._jobs.pop(key, None)
                return
        try:
            jobs = frozenset(referenced_jobs(InferenceService.from_resource(body)))
        except Exception:  # noqa: BLE001 - a spec the models cannot read references nothing yet
            jobs = frozenset()
        with self._lock:
            self._jobs[key] = jobs

    def servers_of(self, namespace: str, job: str) -> list[str]:
        with self._lock:
            return sorted(name for (ns, name), jobs in self._jobs.items() if ns == namespace and job in jobs)


references = References()
