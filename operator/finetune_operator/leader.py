"""Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics.

Several operator replicas may run; only the one holding the Lease runs kopf (and so makes any
write). The others wait, serve their liveness endpoint, and take over when the holder stops
renewing:

- `lease_duration` (15 s): how long a standby waits, from the moment it last *observed* the
  Lease change, before it may take it over. Observed on the standby's own monotonic clock, as
  client-go does, so clock skew between nodes does not matter.
- `renew_deadline` (10 s): a leader that has not renewed for this long stops leading. It
  exits at once (client-go's controllers call `klog.Fatal` there): after the deadline a
  standby may lead, and two writers must never overlap.
- `retry_period` (2 s): how often a standby tries to acquire, and a leader renews.

Every write is an update with the Lease's resourceVersion (optimistic concurrency), so two
candidates that both see an expired Lease cannot both win. A leader that stops cleanly
(SIGTERM) releases the Lease (holder cleared, duration 1 s), so a standby leads within one
retry period instead of a lease duration.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

DEFAULT_LEASE_NAME = "finetune-operator"


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str = DEFAULT_LEASE_NAME
    identity: str = ""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError("leader election needs lease duration > renew deadline > retry period > 0 "
                             f"(got {self.lease_duration}, {self.renew_deadline}, {self.retry_period})")


def default_identity() -> str:
    """The pod's name (its hostname) and a random suffix, as client-go's controllers use."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:12]}"


def _now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseConflict(Exception):
    """Another candidate wrote the Lease first (HTTP 409) or created it first."""


class LeaseAPI:
    """The three calls on one Lease, as plain dicts (so MicroTime round-trips unchanged); API
    errors are handled by `kube.call`: absent is None, a conflict is LeaseConflict."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        from kubernetes import client

        self._api = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name

    def get(self) -> Optional[dict]:
        from finetune_operator import kube

        resp = kube.call(self._api.read_namespaced_lease, self.name, self.namespace, absent=True,
                         _preload_content=False, _request_timeout=5)
        return None if resp is None else json.loads(resp.data)

    def _write(self, method: Callable[..., Any], *args: Any, what: str) -> dict:
        from finetune_operator import kube

        resp = kube.call(method, *args, conflict=True, _preload_content=False, _request_timeout=5)
        if resp is None:
            raise LeaseConflict(what)
        return json.loads(resp.data)

    def _body(self, spec: dict, resource_version: Optional[str] = None) -> dict:
        meta = {"name": self.name, "namespace": self.namespace}
        if resource_version:
            meta["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def create(self, spec: dict) -> dict:
        return self._write(self._api.create_namespaced_lease, self.namespace, self._body(spec),
                           what="the Lease was created by another candidate")

    def update(self, lease: dict, spec: dict) -> dict:
        body = self._body(spec, lease["metadata"]["resourceVersion"])
        return self._write(self._api.replace_namespaced_lease, self.name, self.namespace, body,
                           what="the Lease changed since it was read")


class LeaderElector:
    def __init__(self, config: LeaseConfig, api: LeaseAPI, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.identity = config.identity or default_identity()
        self.api = api
        self.clock = clock
        self._observed_spec: Optional[dict] = None
        self._observed_at = 0.0
        self.last_renewed = 0.0

    # --- one attempt, as client-go's tryAcquireOrRenew -------------------------------------
    def try_acquire_or_renew(self) -> bool:
        now = self.clock()
        lease = self.api.get()
        fresh = {"holderIdentity": self.identity, "leaseDurationSeconds": int(round(self.config.lease_duration)),
                 "acquireTime": _now_micro(), "renewTime": _now_micro(), "leaseTransitions": 0}
        if lease is None:
            try:
                self._observe(self.api.create(fresh)["spec"], now)
            except LeaseConflict:
                return False
            self.last_renewed = now
            return True
        spec = lease.get("spec") or {}
        if spec != self._observed_spec:
            self._observe(spec, now)
        holder = spec.get("holderIdentity") or ""
        held_for = float(spec.get("leaseDurationSeconds") or self.config.lease_duration)
        if holder and holder != self.identity and self._observed_at + held_for > now:
            return False  # someone else holds it and was seen renewing within its duration
        new = dict(fresh)
        if holder == self.identity:
            new["acquireTime"] = spec.get("acquireTime") or new["acquireTime"]
            new["leaseTransitions"] = int(spec.get("leaseTransitions") or 0)
        else:
            new["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        try:
            self._observe(self.api.update(lease, new)["spec"], now)
        except LeaseConflict:
            return False
        self.last_renewed = now
        return True

    def _observe(self, spec: dict, now: float) -> None:
        self._observed_spec = spec
        self._observed_at = now

    # --- the loops ---------------------------------------------------------------------------
    def acquire(self, stop: threading.Event) -> bool:
        """Block until this candidate leads (True) or `stop` is set (False)."""
        announced = False
        while not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    log.info("leader election: acquired Lease %s/%s as %s", self.config.namespace,
                             self.config.name, self.identity)
                    return True
            except Exception as exc:  # the API server may be away; keep trying
                log.warning("leader election: cannot read or write Lease %s/%s: %s", self.config.namespace,
                            self.config.name, exc)
            if not announced:
                holder = (self._observed_spec or {}).get("holderIdentity") or "nobody"
                log.info("leader election: standing by as %s; Lease %s/%s is held by %s", self.identity,
                         self.config.namespace, self.config.name, holder)
                announced = True
            stop.wait(self.config.retry_period)
        return False

    def renew_until_lost(self, stop: threading.Event) -> bool:
        """Renew every retry period; return False once no renewal succeeded within the renew
        deadline (leadership lost), True when `stop` was set while still leading."""
        while not stop.wait(self.config.retry_period):
            try:
                if self.try_acquire_or_renew():
                    continue
                reason = f"the Lease is held by {(self._observed_spec or {}).get('holderIdentity')}"
            except Exception as exc:
                reason = f"cannot renew: {exc}"
            if self.clock() - self.last_renewed >= self.config.renew_deadline:
                log.error("leader election: lost Lease %s/%s (%s)", self.config.namespace, self.config.name, reason)
                return False
            log.warning("leader election: renewal failed (%s); retrying until the renew deadline", reason)
        return True

    def release(self) -> None:
        """Give the Lease up at once (ReleaseOnCancel), if this candidate still holds it."""
        try:
            lease = self.api.get()
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = dict(lease["spec"], holderIdentity="", leaseDurationSeconds=1, renewTime=_now_micro())
            self.api.update(lease, spec)
            log.info("leader election: released Lease %s/%s", self.config.namespace, self.config.name)
        except Exception as exc:
            log.warning("leader election: could not release the Lease (a standby takes over once it "
                        "expires): %s", exc)


def exit_when_lost(elector: LeaderElector, stop: threading.Event, exit: Callable[[int], Any] = os._exit) -> threading.Thread:
    """Renew in a daemon thread; when leadership is lost, end the process at once (no write
    after the renew deadline; Kubernetes restarts the pod as a standby)."""
    def run() -> None:
        if not elector.renew_until_lost(stop):
            logging.shutdown()
            exit(1)

    thread = threading.Thread(target=run, name="leader-renew", daemon=True)
    thread.start()
    return thread
