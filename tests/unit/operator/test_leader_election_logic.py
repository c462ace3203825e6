"""The Lease logic of leader.py on an in-memory Lease store with resourceVersions and a fake
clock (the cluster test, tests/cluster/test_leader_election.py, runs it against the real API
server; this one covers timings that would take minutes there)."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading

import pytest

from finetune_operator.leader import LeaderElector, LeaseConfig, LeaseConflict


class Store:
    def __init__(self):
        self.lease = None
        self.version = 0
        self.down = False

    def api(self):
        store = self

        class Api:
            def get(self):
                if store.down:
                    raise ConnectionError("API server unreachable")
                return copy.deepcopy(store.lease)

            def create(self, spec):
                if store.lease is not None:
                    raise LeaseConflict("exists")
                store.version += 1
                store.lease = {"metadata": {"resourceVersion": str(store.version)}, "spec": dict(spec)}
                return copy.deepcopy(store.lease)

            def update(self, lease, spec):
                if store.down:
                    raise ConnectionError("API server unreachable")
                if lease["metadata"]["resourceVersion"] != store.lease["metadata"]["resourceVersion"]:
                    raise LeaseConflict("changed")
                store.version += 1
                store.lease = {"metadata": {"resourceVersion": str(store.version)}, "spec": dict(spec)}
                return copy.deepcopy(store.lease)
        return Api()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def elector(store, clock, name):
    return LeaderElector(LeaseConfig(namespace="ns", identity=name), store.api(), clock=clock)


def test_a_held_lease_is_taken_only_after_its_duration_without_renewal_as_observed_locally():
    store, clock = Store(), Clock()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.t += 14
    assert a.try_acquire_or_renew()  # a renews: b sees a new record and restarts its wait
    clock.t += 14
    assert not b.try_acquire_or_renew()
    clock.t += 14.5  # 14.5 s since b saw the last change... still under 15 s from b's observation
    assert not b.try_acquire_or_renew()
    clock.t += 1
    assert b.try_acquire_or_renew()
    assert store.lease["spec"]["holderIdentity"] == "b" and store.lease["spec"]["leaseTransitions"] == 1


def test_two_candidates_racing_for_an_expired_lease_cannot_both_win():
    store, clock = Store(), Clock()
    a, b, c = (elector(store, clock, n) for n in "abc")
    assert a.try_acquire_or_renew()
    b.try_acquire_or_renew(), c.try_acquire_or_renew()
    clock.t += 16
    stale = store.api().get()
    real_get = b.api.get
    b.api.get = lambda: copy.deepcopy(stale)  # b read before c wrote
    assert c.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # its update carries the old resourceVersion: 409
    b.api.get = real_get
    assert store.lease["spec"]["holderIdentity"] == "c"


def test_a_leader_that_cannot_renew_for_the_renew_deadline_gives_up():
    store, clock = Store(), Clock()
    a = elector(store, clock, "a")
    assert a.try_acquire_or_renew()
    store.down = True
    stop = threading.Event()

    class Ticks(threading.Event):
        def wait(self, timeout=None):
            clock.t += timeout
            return False

    assert a.renew_until_lost(Ticks()) is False
    assert clock.t - 1000.0 >= 10.0 and clock.t - 1000.0 < 15.0  # before any standby may lead
    del stop


def test_release_lets_a_standby_lead_at_once():
    store, clock = Store(), Clock()
    a, b = elector(store, clock, "a"), elector(store, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert store.lease["spec"]["holderIdentity"] == ""
    assert b.try_acquire_or_renew()


def test_timings_must_be_ordered():
    with pytest.raises(ValueError, match="lease duration > renew deadline > retry period"):
        LeaseConfig(namespace="ns", lease_duration=10, renew_deadline=10, retry_period=2)


def test_leader_elect_without_a_namespace_is_refused_before_anything_starts():
    env = {"PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "finetune_operator", "--leader-elect"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--leader-election-namespace" in r.stderr, r.stderr
