"""kopf handlers: thin glue between events and the pure builders and status derivation.

`api()` is the Kubernetes client the handlers share, configured once at startup.
"""

from __future__ import annotations

import threading

from kubernetes import client, config

_api: client.ApiClient | None = None
_api_lock = threading.Lock()


def api() -> client.ApiClient:
    global _api
    with _api_lock:
        if _api is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            _api = client.ApiClient()
        return _api
