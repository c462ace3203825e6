"""The one small Kubernetes helper the handlers use: typed API groups, create-or-read, read or
None, delete if present, server-side apply, status patches. Every `ApiException` the operator
tolerates is handled here (`call`), the way crate-operator's `call_kubeapi` does; anything else
propagates to kopf, which retries the handler.
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from finetune_api.schema import GROUP, VERSION

FIELD_MANAGER = "finetune-operator"
APPLY_PATCH = "application/apply-patch+yaml"
# A merge patch replaces lists (ownerReferences) where a strategic one would merge them.
MERGE_PATCH = "application/merge-patch+json"
NOT_FOUND, FORBIDDEN, CONFLICT = 404, 403, 409
# Kinds applied with server-side apply: (group, version, plural); "" is the core group.
PLURALS = {
    "Deployment": ("apps", "v1", "deployments"),
    "Service": ("", "v1", "services"),
    "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets"),
    "PodMonitor": ("monitoring.coreos.com", "v1", "podmonitors"),
    "HorizontalPodAutoscaler": ("autoscaling", "v2", "horizontalpodautoscalers"),
    "ScaledObject": ("keda.sh", "v1alpha1", "scaledobjects"),
}

_api: client.ApiClient | None = None
_api_lock = threading.Lock()


# Every request of the handlers ends: (connect, read) seconds, unless a call says otherwise. A
# request with no timeout parks a handler thread for good when a connection dies silently.
REQUEST_TIMEOUT = (5.0, 30.0)
CONNECTION_POOL_SIZE = 64


class CountingApiClient(client.ApiClient):
    """Counts every request by method and status code (finetune_operator_api_requests_total),
    and gives every request a timeout (REQUEST_TIMEOUT)."""

    def call_api(self, method, url, header_params=None, body=None, post_params=None,
                 _request_timeout=None):
        from finetune_operator import metrics

        try:
            response = super().call_api(method, url, header_params, body, post_params,
                                        _request_timeout=_request_timeout or REQUEST_TIMEOUT)
        except ApiException as exc:
            metrics.api_requests.labels(method, str(exc.status or "error")).inc()
            raise
        except Exception:
            metrics.api_requests.labels(method, "error").inc()
            raise
        metrics.api_requests.labels(method, str(response.status)).inc()
        return response


def api() -> client.ApiClient:
    """The client the handlers share: in-cluster credentials, else the kubeconfig."""
    global _api
    with _api_lock:
        if _api is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            cfg = client.Configuration.get_default_copy()
            # Handler threads and the child-creating pool share these connections (urllib3
            # opens and drops extra ones past the pool's size, one TLS handshake each).
            cfg.connection_pool_maxsize = CONNECTION_POOL_SIZE
            _api = CountingApiClient(cfg)
        return _api


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api())


def batch() -> client.BatchV1Api:
    return client.BatchV1Api(api())


def apps() -> client.AppsV1Api:
    return client.AppsV1Api(api())


def rbac() -> client.RbacAuthorizationV1Api:
    return client.RbacAuthorizationV1Api(api())


def custom(api_client: Optional[client.ApiClient] = None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client or api())


def as_dict(obj: Any) -> dict:
    return api().sanitize_for_serialization(obj)


def call(method: Callable[..., Any], *args: Any, absent: bool = False, conflict: bool = False,
         forbidden: bool = False, **kwargs: Any) -> Any:
    """`method(*args, **kwargs)`; None instead of raising for a 404 (absent=True), a 409
    (conflict=True) or a 403 (forbidden=True). Everything else raises."""
    try:
        return method(*args, **kwargs)
    except ApiException as e:
        if (e.status == NOT_FOUND and absent) or (e.status == CONFLICT and conflict) \
                or (e.status == FORBIDDEN and forbidden):
            return None
        raise


def again_on_conflict(first: Callable[[], Any], again: Callable[[], Any],
                      counted: Optional[Callable[[], None]] = None) -> Any:
    """`first()`; when a write of it was refused with a 409 (written against an old version),
    `again()` (which reads afresh). A second 409 raises."""
    try:
        return first()
    except ApiException as e:
        if e.status != CONFLICT:
            raise
        if counted is not None:
            counted()
        return again()


def exists(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Optional[bool]:
    """Whether the object `method` reads exists; None when the operator may not look (403)."""
    try:
        method(*args, **kwargs)
        return True
    except ApiException as e:
        if e.status == NOT_FOUND:
            return False
        if e.status == FORBIDDEN:
            return None
        raise


def read(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Optional[dict]:
    """The object as a dict, or None when it does not exist."""
    found = call(method, *args, absent=True, **kwargs)
    return None if found is None else (found if isinstance(found, dict) else as_dict(found))


# The children the operator creates, by kind: (API path prefix, plural). They are created with
# a plain JSON request (`request`) rather than the typed client, whose every call validates the
# body into its pydantic model and parses the answer into another, then back into a dict: for
# a Job, milliseconds of CPU per request, seven requests per FineTuneJob, N jobs at once.
CHILD_PATHS = {
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "Job": ("/apis/batch/v1", "jobs"),
}


def request(verb: str, path: str, body: Optional[dict] = None,
            content_type: str = "application/json") -> dict:
    """One request through the shared client (its connection pool, timeout and counting),
    JSON in and out, no typed models. Raises ApiException on an error status."""
    shared = api()
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type
    params = shared.param_serialize(verb, path, header_params=headers, body=body,
                                    auth_settings=["BearerToken"])
    response = shared.call_api(*params)
    response.read()
    if not 200 <= response.status <= 299:
        raise ApiException.from_response(http_resp=response, body=response.data.decode("utf-8", "replace"),
                                         data=None)
    return json.loads(response.data)


def create(body: dict, create_method: Optional[Callable[..., Any]] = None,
           read_method: Optional[Callable[..., Any]] = None) -> Optional[dict]:
    """Create `body`; when it exists already (409) return what is there (read_method, or a GET
    for the kinds of CHILD_PATHS when read_method is given) or None."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    path = CHILD_PATHS.get(body.get("kind", ""))
    if path is not None:
        collection = f"{path[0]}/namespaces/{ns}/{path[1]}"
        created = call(request, "POST", collection, body, conflict=True)
        if created is not None:
            return created
        return call(request, "GET", f"{collection}/{name}", absent=True) if read_method else None
    created = call(create_method, ns, body, conflict=True)
    if created is not None:
        return as_dict(created)
    return read(read_method, name, ns) if read_method else None


def delete(method: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Delete; an object already gone is fine."""
    call(method, *args, absent=True, **kwargs)


def apply(body: dict) -> None:
    """Server-side apply of a child (field manager finetune-operator, conflicts forced)."""
    group, version, plural = PLURALS[body["kind"]]
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if group == "":
        patch = getattr(core(), f"patch_namespaced_{body['kind'].lower()}")
        patch(name, ns, body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_PATCH)
        return
    custom().patch_namespaced_custom_object(group, version, ns, plural, name, body,
                                            field_manager=FIELD_MANAGER, force=True,
                                            _content_type=APPLY_PATCH)


def delete_applied(kind: str, namespace: str, name: str) -> None:
    group, version, plural = PLURALS[kind]
    delete(custom().delete_namespaced_custom_object, group, version, namespace, plural, name)


def crd_exists(name: str) -> bool:
    """Whether a CRD is installed (False too when the operator may not read CRDs)."""
    return bool(exists(client.ApiextensionsV1Api(api()).read_custom_resource_definition, name))


def read_own(plural: str, namespace: str, name: str,
             api_client: Optional[client.ApiClient] = None) -> Optional[dict]:
    """One of the operator's own custom resources (finetune.dev), or None."""
    return read(custom(api_client).get_namespaced_custom_object, GROUP, VERSION, namespace,
                plural, name)


def patch_status(plural: str, namespace: str, name: str, status: dict,
                 resource_version: Optional[str] = None) -> dict:
    """A merge patch of the status; with `resource_version`, only onto that version of the
    object (optimistic concurrency: a 409 when someone wrote since it was read). Returns the
    object as written."""
    body: dict = {"status": status}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    # A plain JSON request: the typed client validates every call's arguments with pydantic,
    # 7% of the operator's samples at N=1000 for one status patch per phase per job (#14).
    return request("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}/{name}/status",
                   body, content_type=MERGE_PATCH)


@contextmanager
def logged(log: logging.Logger, what: str) -> Iterator[None]:
    """For event handlers, which kopf does not retry (the next event is the retry): an API
    error is logged with what was being done, and swallowed."""
    try:
        yield
    except ApiException as e:
        log.warning("%s failed: %s %s %s", what, e.status, e.reason, (e.body or "")[:500])
