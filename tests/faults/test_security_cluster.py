"""Security against the real control plane: Pod Security admission, RBAC, where Secret values go.

- Every pod the project creates (single- and multi-node trainer pods, vLLM pods, the
  operator's own pod from the chart) is admitted in a namespace that enforces the
  `restricted` Pod Security Standard.
- `kubectl auth can-i --list` for the operator's ServiceAccount (RBAC from the chart) and for
  a per-job trainer ServiceAccount grants nothing beyond what is documented.
- A canary Secret value referenced by the spec never shows up in status, events,
  ConfigMaps, the operator's log or Job/pod objects (only secretKeyRef references).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import yaml

from tests.fixtures.cluster import REPO_ROOT, get_json, wait_for
from tests.unit.chart.test_chart import kube_version
from tests.cluster.test_operator_lifecycle import apply, ftj, status, trainer_pods

pytestmark = [pytest.mark.reliability, pytest.mark.cluster]

RULES = yaml.safe_load((REPO_ROOT / "charts" / "finetune-operator" / "files" / "rbac" / "rules.yaml").read_text())
# What every authenticated identity may do (system:basic-user, system:discovery, system:public-info-viewer).
BASELINE = {("selfsubjectaccessreviews.authorization.k8s.io", "create"),
            ("selfsubjectrulesreviews.authorization.k8s.io", "create"),
            ("selfsubjectreviews.authentication.k8s.io", "create")}


def restrict(cluster, namespace: str) -> None:
    cluster.kubectl("label", "namespace", namespace, "--overwrite",
                    "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest")


def pod_security_refusals(cluster, namespace: str) -> list[str]:
    events = get_json(cluster, "events", "-n", namespace)["items"]
    return [e["message"] for e in events if e.get("reason") == "FailedCreate"
            and ("PodSecurity" in e.get("message", "") or "violates" in e.get("message", ""))]


def test_every_project_pod_is_admitted_under_the_restricted_pod_security_standard(cluster, namespace, operator):
    """Given a namespace enforcing `restricted`, when a single-node and a two-node FineTuneJob, an
    InferenceService and the chart's operator Deployment are created in it, then each gets its pods
    (no FailedCreate event naming PodSecurity), and a privileged pod is refused there (the
    admission plugin is really on)."""
    restrict(cluster, namespace)
    privileged = cluster.kubectl("run", "probe", "-n", namespace, "--image=busybox", "--restart=Never",
                                 "--overrides", json.dumps({"spec": {"containers": [{
                                     "name": "probe", "image": "busybox",
                                     "securityContext": {"privileged": True}}]}}), check=False)
    assert privileged.returncode != 0 and "violates PodSecurity" in privileged.stderr

    apply(cluster, namespace, ftj("single"))
    apply(cluster, namespace, ftj("multi", resources={"gpusPerNode": 1, "nodes": 2}))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "serve"},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, "resources": {"gpus": 1}}}))
    objects = helm_template(cluster, namespace, f"psa-{namespace}")
    chart_objects = [o for o in objects if o["kind"] in ("ServiceAccount", "Deployment")]
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": chart_objects}))

    wait_for(lambda: trainer_pods(cluster, namespace, "single"), timeout=60, what="the single-node trainer pod")
    wait_for(lambda: len(trainer_pods(cluster, namespace, "multi")) == 2, timeout=60,
             what="both multi-node trainer pods")
    wait_for(lambda: get_json(cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/name=vllm")["items"],
             timeout=90, what="the vLLM pod")
    wait_for(lambda: get_json(cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/name=finetune-operator")["items"],
             timeout=60, what="the operator's own pod from the chart")
    assert pod_security_refusals(cluster, namespace) == []
    for name in ("single", "multi"):
        assert status(cluster, namespace, name).get("phase") != "Failed"


def helm_template(cluster, namespace: str, release: str, *args: str) -> list[dict]:
    import subprocess

    rendered = subprocess.run([str(cluster.bin_dir / "helm"), "template", release,
                               str(REPO_ROOT / "charts" / "finetune-operator"), "-n", namespace,
                               "--kube-version", kube_version(),
                               "--set", f"watchNamespaces={{{namespace}}}", *args],
                              capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(rendered) if d]


ROW = re.compile(r"^(\S*)\s+(\[.*?\])\s+(\[.*?\])\s+(\[.*?\])\s*$")


def can_i_list(cluster, namespace: str, user: str) -> set[tuple[str, str, str]]:
    """(resource.group, resourceNames, verb) the user may use in the namespace, from `auth can-i --list`."""
    out = cluster.kubectl("auth", "can-i", "--list", f"--as={user}", "-n", namespace).stdout
    granted = set()
    for line in out.splitlines()[1:]:
        match = ROW.match(line)
        if not match or not match.group(1):
            continue  # non-resource URLs (discovery, /healthz...) are the built-in public ones
        resource, names, verbs = match.group(1), match.group(3), match.group(4)
        for verb in verbs.strip("[]").split():
            granted.add((resource, names, verb))
    return granted


def documented(sections: list[str]) -> set[tuple[str, str]]:
    out = set()
    for section in sections:
        for rule in RULES[section]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    base, _, sub = resource.partition("/")
                    qualified = (f"{base}.{group}" if group else base) + (f"/{sub}" if sub else "")
                    for verb in rule["verbs"]:
                        out.add((qualified, verb))
    return out


def test_operator_and_trainer_service_accounts_hold_only_the_documented_permissions(cluster, namespace, operator):
    """Given the chart's ServiceAccount, Role, RoleBinding, ClusterRole and ClusterRoleBinding applied
    for this namespace, and a FineTuneJob's own trainer ServiceAccount, then `kubectl auth can-i
    --list` shows exactly the rules of files/rbac/rules.yaml for the operator, and for the trainer
    only get on its own FineTuneJob and get/patch on its status (plus the self-reviews every
    identity has)."""
    release = f"rbac-{namespace}"
    objects = [o for o in helm_template(cluster, namespace, release)
               if o["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")]
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    sa = next(o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount")
    try:
        granted = can_i_list(cluster, namespace, f"system:serviceaccount:{namespace}:{sa}")
        # The release namespace is this namespace here, so the leader-election Role applies too.
        sections = ["namespaced", "cluster", "leaderElection"]
        allowed = documented(sections) | BASELINE
        extra = {(r, v) for r, _, v in granted} - allowed
        missing = documented(sections) - {(r, v) for r, _, v in granted}
        print(f"operator: {len(granted)} (resource, names, verb) grants, {len(extra)} undocumented")
        assert extra == set(), f"undocumented operator permissions: {sorted(extra)}"
        assert missing == set(), f"documented but not granted: {sorted(missing)}"
        assert not any(r == "secrets" and v in ("list", "watch", "create", "update", "patch", "delete")
                       for r, _, v in granted)
    finally:
        for kind in ("ClusterRole", "ClusterRoleBinding"):
            for o in objects:
                if o["kind"] == kind:
                    cluster.kubectl("delete", kind.lower(), o["metadata"]["name"], check=False)

    apply(cluster, namespace, ftj("ident", resources={"nodeSelector": {"finetune.dev/test-node": "nowhere"}}))
    wait_for(lambda: cluster.kubectl("get", "rolebinding", "ident-trainer", "-n", namespace,
                                     check=False).returncode == 0, timeout=60, what="the trainer RoleBinding")
    trainer = can_i_list(cluster, namespace, f"system:serviceaccount:{namespace}:ident-trainer")
    print(f"trainer grants: {sorted(trainer)}")
    assert {(r, n, v) for r, n, v in trainer if (r, v) not in BASELINE} == {
        ("finetunejobs.finetune.dev", "[ident]", "get"),
        ("finetunejobs.finetune.dev/status", "[ident]", "get"),
        ("finetunejobs.finetune.dev/status", "[ident]", "patch"),
        # the comparison Job publishes the review page's material into this one ConfigMap
        ("configmaps", "[ident-review]", "get"),
        ("configmaps", "[ident-review]", "patch"),
    }


def test_secret_values_never_leave_the_secret(cluster, namespace, operator):
    """Given a canary token Secret referenced by spec.model.tokenSecretRef and
    spec.objectStorage.secretRef (for an s3:// push), when a FineTuneJob runs to Succeeded on kwok, then the canary
    appears in no FineTuneJob, Event, ConfigMap, Job, pod (spec or termination message) nor in the
    operator's log, and the trainer container gets it only through secretKeyRef env entries."""
    canary = f"hf_CANARY{uuid.uuid4().hex}"
    cluster.kubectl("create", "secret", "generic", "hub", f"--from-literal=token={canary}",
                    f"--from-literal=AWS_ACCESS_KEY_ID={canary}-id",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={canary}-s3", "-n", namespace)
    apply(cluster, namespace, ftj("leak", model={"tokenSecretRef": {"name": "hub"}},
                                  output={"push": {"uri": "s3://bucket/leak"}},
                                  objectStorage={"secretRef": {"name": "hub"}}))
    wait_for(lambda: status(cluster, namespace, "leak").get("phase") == "Succeeded", timeout=90,
             what="the job to succeed", interval=1)

    scanned = {}
    for kind in ("finetunejobs", "events", "configmaps", "jobs", "pods", "serviceaccounts", "roles"):
        text = json.dumps(get_json(cluster, kind, "-n", namespace))
        scanned[kind] = len(text)
        assert canary not in text, f"the canary leaked into {kind}"
    log = Path(operator.log).read_text(errors="replace")
    scanned["operator log"] = len(log)
    assert canary not in log
    print(f"bytes scanned for the canary: {scanned}")

    (pod,) = trainer_pods(cluster, namespace, "leak")
    env = pod["spec"]["containers"][0]["env"]
    secret_env = [e for e in env if "secretKeyRef" in (e.get("valueFrom") or {})]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in secret_env} == {"hub"}
    # HF_TOKEN, and the five AWS variables of spec.objectStorage (three of them optional)
    assert len(secret_env) == 6 and all("value" not in e for e in secret_env)
    assert not any(v.get("secret") for v in pod["spec"]["volumes"])
