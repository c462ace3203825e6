"""Shared fixtures live in tests/fixtures/; this file only registers them."""

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.ml", "tests.fixtures.operator"]
