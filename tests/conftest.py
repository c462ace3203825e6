"""Shared fixtures live in tests/fixtures/; this file only registers them."""

import signal

import pytest

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.ml", "tests.fixtures.operator"]

# A run stopped with SIGTERM (a CI time limit, `timeout`) tears down like Ctrl-C, so the
# session's control plane, operator and local pods are stopped instead of left running.
signal.signal(signal.SIGTERM, signal.default_int_handler)


def pytest_collection_modifyitems(items):
    """Tests against the local control plane run on fake kwok nodes whose simulated readiness can
    flap on a loaded 2-core machine: such a test gets one rerun, which the summary reports
    ("rerun"), so a flake stays visible while a real failure still fails twice."""
    for item in items:
        if item.get_closest_marker("cluster") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=5))
