"""`--log-format json`: one JSON object per line, with the object a line is about."""

from __future__ import annotations

import json
import logging

from finetune_operator.logs import JsonFormatter


def test_a_line_about_an_object_carries_its_namespace_name_and_uid():
    record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, "Handler %r succeeded.", ("spec",), None)
    record.k8s_ref = {"kind": "FineTuneJob", "namespace": "ml", "name": "bot", "uid": "u-1", "apiVersion": "x"}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "Handler 'spec' succeeded." and line["level"] == "info"
    assert {k: line[k] for k in ("kind", "namespace", "name", "uid")} == {
        "kind": "FineTuneJob", "namespace": "ml", "name": "bot", "uid": "u-1"}
    assert line["time"].endswith("+00:00")


def test_a_line_about_nothing_in_particular_and_an_exception():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record = logging.LogRecord("finetune_operator", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = json.loads(JsonFormatter().format(record))
    assert "namespace" not in line and "ValueError: boom" in line["exception"]


def test_kopfs_per_handler_success_lines_are_left_out_at_info_and_shown_at_debug():
    """kopf writes "Handler 'x' succeeded." for every handler call: a line for every watch event
    of every trainer Job and pod (5% of the operator's busy CPU at N=1000, #14). At INFO they
    are left out, kopf's warnings and errors are not; DEBUG shows everything."""
    from finetune_operator import logs

    root, kopf_objects = logging.getLogger(), logging.getLogger(logs.KOPF_OBJECTS)
    saved = list(root.handlers), root.level, kopf_objects.level
    try:
        logs.configure("INFO", "json")
        assert not kopf_objects.isEnabledFor(logging.INFO) and kopf_objects.isEnabledFor(logging.WARNING)
        assert logging.getLogger("finetune_operator").isEnabledFor(logging.INFO)
        logs.configure("DEBUG", "text")
        assert kopf_objects.isEnabledFor(logging.DEBUG) and kopf_objects.isEnabledFor(logging.INFO)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        kopf_objects.setLevel(saved[2])
