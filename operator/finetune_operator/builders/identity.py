"""The trainer's identity: a ServiceAccount that may read its own FineTuneJob and patch
only that job's status (progress, metrics, checkpoints), and the job's review ConfigMap
(the comparison Job fills it). Nothing cluster-wide."""

from __future__ import annotations

from finetune_api.models import FineTuneJob
from finetune_api.schema import GROUP

from finetune_operator import names
from finetune_operator.builders import object_meta

COMPONENT = "trainer"


def build_service_account(job: FineTuneJob) -> dict:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": object_meta(job, names.trainer_service_account(job.metadata.name), COMPONENT),
            "automountServiceAccountToken": True}


def build_role(job: FineTuneJob) -> dict:
    own = [job.metadata.name]
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": object_meta(job, names.trainer_role(job.metadata.name), COMPONENT),
            "rules": [
                {"apiGroups": [GROUP], "resources": ["finetunejobs"], "resourceNames": own,
                 "verbs": ["get"]},
                {"apiGroups": [GROUP], "resources": ["finetunejobs/status"], "resourceNames": own,
                 "verbs": ["get", "patch"]},
                # The comparison Job publishes the review page's material into this one ConfigMap.
                {"apiGroups": [""], "resources": ["configmaps"],
                 "resourceNames": [names.review_config_map(job.metadata.name)], "verbs": ["get", "patch"]},
            ]}


def build_role_binding(job: FineTuneJob) -> dict:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": object_meta(job, names.trainer_role_binding(job.metadata.name), COMPONENT),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": names.trainer_role(job.metadata.name)},
            "subjects": [{"kind": "ServiceAccount",
                          "name": names.trainer_service_account(job.metadata.name),
                          "namespace": job.metadata.namespace}]}
