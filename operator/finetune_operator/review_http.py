"""The operator's HTTP port: Prometheus `/metrics` and each FineTuneJob's review page.

    GET  /metrics
    GET  /jobs/<namespace>/<name>/report     the review page (finetune_api.review)
    POST /jobs/<namespace>/<name>/verdicts   verdict form  -> annotation finetune.dev/review-verdicts
    POST /jobs/<namespace>/<name>/approval   approve/reject -> annotation finetune.dev/approved (+ reason)

The page is rendered from the FineTuneJob and its review ConfigMap (the claim is not mounted
in the operator; the comparison Job fills the ConfigMap). Reading needs only a way to the
port (keep the Service cluster-internal; `kubectl port-forward` needs rights on the
operator's pods). Writing needs a bearer token, sent as the forms' `token` field (plain HTML
forms: no JavaScript needed) or an Authorization header, whose user may `update` that
FineTuneJob: TokenReview, then SubjectAccessReview. The token is never logged or stored;
annotations record the user's name.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import re
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from finetune_api import review
from finetune_api.schema import GROUP, VERSION

from finetune_operator import kube, metrics, names, settings
from finetune_operator.status import APPROVAL_REASON_ANNOTATION, APPROVED_ANNOTATION

log = logging.getLogger("finetune_operator.http")
PLURAL = "finetunejobs"
MAX_FORM_BYTES = 1 << 20
_ROUTE = re.compile(r"^/jobs/([a-z0-9][-a-z0-9]{0,62})/([a-z0-9][-a-z0-9.]{0,252})/(report|verdicts|approval)$")


class Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def authorize(token: str, namespace: str, name: str) -> str:
    """The user behind `token` when it may update the FineTuneJob; Refused otherwise."""
    from kubernetes import client

    if not token:
        raise Refused(HTTPStatus.UNAUTHORIZED, "a bearer token is needed (the form's token field)")
    api = kube.api()
    reviewed = client.AuthenticationV1Api(api).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))).status
    if not reviewed or not reviewed.authenticated:
        raise Refused(HTTPStatus.UNAUTHORIZED, "the token was not accepted by the API server")
    user = reviewed.user
    access = client.AuthorizationV1Api(api).create_subject_access_review(client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user.username, groups=user.groups, uid=user.uid, extra=user.extra,
            resource_attributes=client.V1ResourceAttributes(
                namespace=namespace, verb="update", group=GROUP, resource=PLURAL, name=name)))).status
    if not access.allowed:
        raise Refused(HTTPStatus.FORBIDDEN, f"{user.username} may not update FineTuneJob {namespace}/{name}")
    return user.username


def render_report(namespace: str, name: str) -> str | None:
    job = kube.read_own(PLURAL, namespace, name)
    if job is None:
        return None
    cm = kube.read(kube.core().read_namespaced_config_map, names.review_config_map(name), namespace) or {}
    data, binary = cm.get("data") or {}, cm.get("binaryData") or {}
    comparison = _json(data.get(review.COMPARISON_KEY))
    dataset = _json(data.get(review.DATASET_KEY))
    plot = base64.b64decode(binary[review.LOSS_PLOT_KEY]) if review.LOSS_PLOT_KEY in binary else None
    return review.render(job, comparison, loss_png=plot, dataset=dataset,
                         actions=f"/jobs/{namespace}/{name}")


def _json(text: str | None) -> dict | None:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def record_verdicts(namespace: str, name: str, user: str, form: dict[str, str]) -> None:
    job = kube.read_own(PLURAL, namespace, name) or {}
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    recorded = _json(annotations.get(review.VERDICTS_ANNOTATION)) or {}
    answers = recorded.get("answers") or {}
    for index, sides in review.parse_verdicts(form).items():
        for side, aspects in sides.items():
            answers.setdefault(index, {}).setdefault(side, {}).update(aspects)
    value = json.dumps({"answers": answers, "by": user, "at": _now()}, sort_keys=True)
    _annotate(namespace, name, {review.VERDICTS_ANNOTATION: value})


def record_approval(namespace: str, name: str, user: str, form: dict[str, str]) -> None:
    decision = form.get("approved")
    if decision not in ("true", "false"):
        raise Refused(HTTPStatus.BAD_REQUEST, "approved must be true or false")
    reason = (form.get("reason") or "").strip()[:500]
    why = f"{reason} (by {user} on the review page)" if reason else f"by {user} on the review page"
    _annotate(namespace, name, {APPROVED_ANNOTATION: decision, APPROVAL_REASON_ANNOTATION: why})


def _annotate(namespace: str, name: str, annotations: dict[str, str]) -> None:
    kube.custom().patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                 {"metadata": {"annotations": annotations}})


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _watched(namespace: str) -> bool:
    watched = settings.current.namespaces
    return not watched or namespace in watched


class Handler(BaseHTTPRequestHandler):
    server_version = "finetune-operator"

    def log_message(self, fmt: str, *args) -> None:  # the request line only; never a body
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: HTTPStatus, message: str) -> None:
        self._send(status, (message + "\n").encode(), "text/plain; charset=utf-8")

    def _route(self) -> tuple[str, str, str] | None:
        match = _ROUTE.match(urllib.parse.urlsplit(self.path).path)
        if not match or not _watched(match.group(1)):
            return None
        return match.group(1), match.group(2), match.group(3)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urllib.parse.urlsplit(self.path).path
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self._send(HTTPStatus.OK, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            return
        route = self._route()
        if route is None or route[2] != "report":
            self._text(HTTPStatus.NOT_FOUND, "not found")
            return
        try:
            page = render_report(route[0], route[1])
        except Exception as exc:  # noqa: BLE001 - an API error is a 502, not a dead port
            log.warning("review page %s/%s: %s", route[0], route[1], exc)
            self._text(HTTPStatus.BAD_GATEWAY, "the API server could not be read")
            return
        if page is None:
            self._text(HTTPStatus.NOT_FOUND, f"no FineTuneJob {route[0]}/{route[1]}")
            return
        self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8",
                   {"Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                                               "form-action 'self'",
                    "Cache-Control": "no-store"})

    def do_POST(self) -> None:  # noqa: N802
        route = self._route()
        if route is None or route[2] == "report":
            self._text(HTTPStatus.NOT_FOUND, "not found")
            return
        namespace, name, action = route
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_FORM_BYTES:
            self._text(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "form too large")
            return
        form = {k: v[-1] for k, v in urllib.parse.parse_qs(self.rfile.read(length).decode(errors="replace"),
                                                           keep_blank_values=True).items()}
        header = self.headers.get("Authorization") or ""
        token = form.pop("token", "") or (header[7:].strip() if header.lower().startswith("bearer ") else "")
        try:
            user = authorize(token, namespace, name)
            if action == "verdicts":
                record_verdicts(namespace, name, user, form)
            else:
                record_approval(namespace, name, user, form)
        except Refused as refused:
            self._text(refused.status, str(refused))
            return
        except Exception as exc:  # noqa: BLE001
            log.warning("review %s of %s/%s failed: %s", action, namespace, name, exc)
            self._text(HTTPStatus.BAD_GATEWAY, "the API server refused the change")
            return
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": f"/jobs/{namespace}/{name}/report"})


_servers: dict[int, ThreadingHTTPServer] = {}


def serve(port: int) -> ThreadingHTTPServer | None:
    """Serve /metrics and the review pages on `port` (0 disables), in a daemon thread; a
    second call for the same port (a standby replica that became leader) does nothing."""
    if not port:
        return None
    if port not in _servers:
        server = ThreadingHTTPServer(("", port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        _servers[port] = server
    return _servers[port]
