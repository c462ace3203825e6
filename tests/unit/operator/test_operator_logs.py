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
