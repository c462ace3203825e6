"""The Kubernetes calls the API makes, with its own credentials (see the chart's RBAC for it).

Blocking calls of the kubernetes client; the server runs them in threads.
"""

from __future__ import annotations

from typing import Optional

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from .mapping import API_LABEL, GROUP, PLURAL, VERSION

ISVC_PLURAL = "inferenceservices"


def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Kube:
    def __init__(self, api: Optional[client.ApiClient] = None) -> None:
        self.api = api or api_client()
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    # FineTuneJobs ------------------------------------------------------------------------------
    def create_job(self, namespace: str, body: dict) -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def get_job(self, namespace: str, name: str) -> Optional[dict]:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_jobs(self, namespace: str) -> list[dict]:
        return self.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, label_selector=f"{API_LABEL}=true")["items"]

    def patch_job(self, namespace: str, name: str, patch: dict) -> dict:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch,
                                                          _content_type="application/merge-patch+json")

    def job_events(self, namespace: str, name: str) -> list[dict]:
        events = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind=FineTuneJob,involvedObject.name={name}")
        return [self.api.sanitize_for_serialization(e) for e in events.items]

    def get_inference_service(self, namespace: str, name: str) -> Optional[dict]:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, ISVC_PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # authentication and authorisation ------------------------------------------------------
    def token_review(self, token: str) -> dict:
        review = client.AuthenticationV1Api(self.api).create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token)))
        return self.api.sanitize_for_serialization(review.status)

    def allowed(self, user: str, groups: list[str], uid: Optional[str], namespace: str, verb: str) -> bool:
        review = client.AuthorizationV1Api(self.api).create_subject_access_review(
            client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
                user=user, groups=groups, uid=uid,
                resource_attributes=client.V1ResourceAttributes(
                    namespace=namespace, verb=verb, group=GROUP, resource=PLURAL))))
        return bool(review.status.allowed)

    def get_secret(self, namespace: str, name: str) -> Optional[dict]:
        try:
            return self.api.sanitize_for_serialization(self.core.read_namespaced_secret(name, namespace))
        except ApiException as e:
            if e.status in (403, 404):
                return None
            raise

    def create_secret(self, namespace: str, body: dict) -> None:
        self.core.create_namespaced_secret(namespace, body)
