"""Shared fixtures live in tests/fixtures/; this file registers them and marks every test by
the folder it is in:

| folder | what | markers added |
| --- | --- | --- |
| `tests/unit/<area>/` | pure functions, builders, the trainer on the tiny model, the chart's rendering | none (a file that trains says `slow` itself) |
| `tests/cluster/` | the real control plane with the operator as a process | `cluster` |
| `tests/e2e/` | whole pipelines: real training, real vLLM | `slow` |
| `tests/faults/` | fault injection and bad input | `reliability` |

A test that needs a cluster or trains also says so in its own file, so it is marked correctly
wherever it lives. There are no automatic reruns: a test that must retry something does it in
its own code and says why.
"""

import signal
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.ml", "tests.fixtures.operator",
                  "tests.fixtures.golden"]

TESTS = Path(__file__).resolve().parent
FOLDER_MARKERS = {"cluster": ("cluster",), "e2e": ("slow",), "faults": ("reliability",)}

# A run stopped with SIGTERM (a CI time limit, `timeout`) tears down like Ctrl-C, so the
# session's control plane, operator and local pods are stopped instead of left running.
signal.signal(signal.SIGTERM, signal.default_int_handler)


def pytest_collection_modifyitems(items):
    for item in items:
        try:
            folder = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        for marker in FOLDER_MARKERS.get(folder, ()):
            item.add_marker(getattr(pytest.mark, marker))
