"""The operator's log formats: `text` for people, `json` (the chart's default) for log pipelines.

JSON lines carry `time`, `level`, `logger` and `message`, and, for lines about one object (kopf's
per-object logger), its `kind`, `namespace`, `name` and `uid`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            line.update({k: ref[k] for k in ("kind", "namespace", "name", "uid") if ref.get(k)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


# kopf's per-object logger. At INFO it writes "Handler 'x' succeeded." for every handler call,
# which is one line for every watch event of every trainer Job and pod: 5% of the operator's
# busy CPU at N=1000 (#14, session 10). At level INFO these lines are left out (its warnings
# and errors stay: a handler that failed or waits); DEBUG shows them all.
KOPF_OBJECTS = "kopf.objects"


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger(KOPF_OBJECTS).setLevel(logging.WARNING if root.level == logging.INFO else logging.NOTSET)
