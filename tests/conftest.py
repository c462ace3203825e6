"""Shared fixtures live in tests/fixtures/; this file only registers them."""

import signal

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.ml", "tests.fixtures.operator"]

# A run stopped with SIGTERM (a CI time limit, `timeout`) tears down like Ctrl-C, so the
# session's control plane, operator and local pods are stopped instead of left running.
signal.signal(signal.SIGTERM, signal.default_int_handler)
