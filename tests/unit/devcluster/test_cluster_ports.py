"""The dev cluster's ports: listening ports from outside the kernel's ephemeral range, and a
start that lost a port to another process is retried with new ports.

Found in a full test run: the session's kube-controller-manager could not bind the port chosen
for it ("bind: address already in use") and every cluster test of the session errored. Ports
then came from bind(0), i.e. from the ephemeral range every outgoing connection's source port
is drawn from."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_devcluster import cluster as devcluster


def ephemeral_range() -> range:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_listening_ports_are_outside_the_ephemeral_range():
    ports = {devcluster.free_port() for _ in range(200)}
    assert not ports & set(ephemeral_range())
    assert len(ports) > 150, "random, so that two clusters starting at once rarely pick the same"


def test_a_start_that_lost_a_port_is_retried_and_other_failures_are_not(tmp_path, monkeypatch):
    c = devcluster.Cluster(tmp_path / "state", local_node=False)
    attempts = []

    def lost_a_port_once(timeout):
        attempts.append(timeout)
        if len(attempts) == 1:
            raise devcluster.ClusterError("kube-controller-manager exited with code 1 while the cluster was "
                                          "starting: listen tcp 127.0.0.1:58391: bind: address already in use")
        return c

    monkeypatch.setattr(c, "_start_once", lost_a_port_once)
    assert c.start(timeout=5) is c and len(attempts) == 2

    def broken(timeout):
        attempts.append(timeout)
        raise devcluster.ClusterError("etcd exited with code 1: no space left on device")

    attempts.clear()
    monkeypatch.setattr(c, "_start_once", broken)
    with pytest.raises(devcluster.ClusterError, match="no space"):
        c.start(timeout=5)
    assert len(attempts) == 1
