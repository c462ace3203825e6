"""Who is calling, and in which namespace they may act. No anonymous access.

A Bearer token is either
- an API key (`sk-ft-...`), stored only as its sha256 in a Secret `openai-api-key-<hash[:16]>`
  in the API's keys namespace, with the one namespace it is bound to; or
- a Kubernetes token (a ServiceAccount's, or any token the API server authenticates), checked
  with a TokenReview. A ServiceAccount acts in its own namespace (another one with the header
  `X-Kubernetes-Namespace`), and every call is authorised with a SubjectAccessReview against
  the FineTuneJob verb it maps to (`create`, `get`, `list`, `patch`, `delete`).

Results are cached for a minute under the token's sha256; a token is never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Optional

from .errors import ApiError, unauthorized

API_KEY_PREFIX = "sk-ft-"
KEY_LABEL = "finetune.dev/openai-api-key"
NAMESPACE_HEADER = "X-Kubernetes-Namespace"
SA_USER = re.compile(r"^system:serviceaccount:([a-z0-9-]+):[a-z0-9.-]+$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_secret_name(digest: str) -> str:
    return f"openai-api-key-{digest[:16]}"


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def api_key_secret(key: str, namespace: str, *, description: str = "") -> dict:
    """The Secret that binds `key` (stored hashed) to `namespace`."""
    digest = key_hash(key)
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": key_secret_name(digest), "labels": {KEY_LABEL: "true"},
                         "annotations": {"finetune.dev/description": description} if description else {}},
            "stringData": {"sha256": digest, "namespace": namespace}}


@dataclass(frozen=True)
class Principal:
    namespace: str
    user: str
    groups: tuple[str, ...] = ()
    uid: Optional[str] = None
    api_key: bool = False


def bearer(header: Optional[str]) -> str:
    if not header:
        raise unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("Send the key as 'Authorization: Bearer <key>'.")
    return token.strip()


class Authenticator:
    def __init__(self, kube, keys_namespace: str, *, cache_seconds: float = 60.0) -> None:
        self.kube = kube
        self.keys_namespace = keys_namespace
        self.cache_seconds = cache_seconds
        self._principals: dict[tuple[str, Optional[str]], tuple[float, Principal]] = {}
        self._decisions: dict[tuple, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def _cached(self, table: dict, key):
        with self._lock:
            hit = table.get(key)
            if hit and hit[0] > time.monotonic():
                return hit[1]
            table.pop(key, None)
            return None

    def _remember(self, table: dict, key, value) -> None:
        with self._lock:
            if len(table) > 10000:
                table.clear()
            table[key] = (time.monotonic() + self.cache_seconds, value)

    def authenticate(self, authorization: Optional[str], namespace_header: Optional[str] = None) -> Principal:
        token = bearer(authorization)
        if namespace_header is not None and not DNS_LABEL.match(namespace_header):
            raise ApiError(400, f"{NAMESPACE_HEADER} must be a namespace name", param=NAMESPACE_HEADER)
        key = (key_hash(token), namespace_header)
        principal = self._cached(self._principals, key)
        if principal is None:
            principal = self._api_key(token) if token.startswith(API_KEY_PREFIX) else self._kube_token(token)
            if namespace_header and namespace_header != principal.namespace:
                if principal.api_key:
                    raise ApiError(403, f"this API key is bound to another namespace, not {namespace_header}",
                                   code="permission_denied")
                principal = Principal(namespace_header, principal.user, principal.groups, principal.uid)
            self._remember(self._principals, key, principal)
        return principal

    def _api_key(self, key: str) -> Principal:
        digest = key_hash(key)
        secret = self.kube.get_secret(self.keys_namespace, key_secret_name(digest))
        data = (secret or {}).get("data") or {}
        stored = base64.b64decode(data.get("sha256", "")).decode(errors="replace")
        if not secret or not hmac.compare_digest(stored, digest) or \
                ((secret.get("metadata") or {}).get("labels") or {}).get(KEY_LABEL) != "true":
            raise unauthorized()
        namespace = base64.b64decode(data.get("namespace", "")).decode(errors="replace")
        if not DNS_LABEL.match(namespace):
            raise unauthorized("This API key is not bound to a namespace.")
        return Principal(namespace, f"api-key:{digest[:16]}", api_key=True)

    def _kube_token(self, token: str) -> Principal:
        status = self.kube.token_review(token) or {}
        if not status.get("authenticated"):
            raise unauthorized()
        user = status.get("user") or {}
        name = user.get("username", "")
        m = SA_USER.match(name)
        namespace = m.group(1) if m else ((user.get("extra") or {}).get("authentication.kubernetes.io/namespace") or [""])[0]
        return Principal(namespace, name, tuple(user.get("groups") or ()), user.get("uid"))

    def authorize(self, principal: Principal, verb: str) -> None:
        """Raise 403 unless `principal` may `verb` FineTuneJobs in its namespace."""
        if not principal.namespace:
            raise ApiError(403, f"this token names no namespace: send the header {NAMESPACE_HEADER}",
                           code="permission_denied")
        if principal.api_key:
            return
        key = (principal.user, principal.groups, principal.uid, principal.namespace, verb)
        allowed = self._cached(self._decisions, key)
        if allowed is None:
            allowed = self.kube.allowed(principal.user, list(principal.groups), principal.uid,
                                        principal.namespace, verb)
            self._remember(self._decisions, key, allowed)
        if not allowed:
            raise ApiError(403, f"{principal.user} may not {verb} finetunejobs.finetune.dev in namespace "
                           f"{principal.namespace}", code="permission_denied")
