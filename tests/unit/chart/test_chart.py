"""The Helm chart (issue 7): rendering, schema, RBAC, monitoring, and a real install.

Rendered output is compared with golden files in tests/golden/chart/; after an intended
change rewrite them with

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests -k golden   (tests/fixtures/golden.py)

The cluster tests install the chart into the local control plane (tests/fixtures/cluster.py);
the operator pod may never run there, which they do not need.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.fixtures.cluster import get_json, wait_for
from tests.fixtures.golden import GOLDEN as GOLDEN_DIR
from tests.fixtures.golden import assert_golden

REPO_ROOT = Path(__file__).resolve().parents[3]
CHART = REPO_ROOT / "charts" / "finetune-operator"
GOLDEN = GOLDEN_DIR / "chart"
RELEASE, RELEASE_NAMESPACE = "finetune-operator", "finetune-system"
FULLNAME = "finetune-operator"  # the release name contains the chart name
VALUE_SETS = ["default", "namespaces-monitoring", "crd-templates-custom"]


def kube_version() -> str:
    versions = dict(line.split("=", 1) for line in (REPO_ROOT / "hack" / "versions.env").read_text().splitlines()
                    if line and not line.startswith("#"))
    return versions["KUBERNETES_VERSION"]


@pytest.fixture(scope="session")
def helm() -> Path:
    """The pinned helm binary built by hack/build-control-plane.sh (HELM overrides it)."""
    if os.environ.get("HELM"):
        return Path(os.environ["HELM"])
    from finetune_devcluster.cluster import control_plane_binaries

    return control_plane_binaries() / "helm"


def run_helm(helm: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
    return out


def values_args(value_set: str) -> list[str]:
    return [] if value_set == "default" else ["-f", str(GOLDEN / f"{value_set}.values.yaml")]


def template(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_helm(helm, "template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE,
                    "--kube-version", kube_version(), *args, check=check)


def render(helm: Path, *args: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(template(helm, *args).stdout) if doc]


def find(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def one(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> dict:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --- lint and golden files --------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_passes(helm, value_set):
    out = run_helm(helm, "lint", "--strict", str(CHART), "--kube-version", kube_version(), *values_args(value_set))
    assert "0 chart(s) failed" in out.stdout


def without_crd_specs(rendered: str) -> str:
    """CRDs rendered as templates keep their metadata; their spec, which is the generated
    CRD's (test_crds_as_templates_are_the_crd_files_with_a_keep_policy), is left out so
    that a schema change does not touch the chart's golden files."""
    return re.sub(r"(\nkind: CustomResourceDefinition\n(?:.*\n)*?)spec:\n(?:  .*\n|\n)*",
                  r"\1spec: {}  # the spec of the generated CRD in crds/\n", rendered)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_chart_matches_golden(helm, value_set):
    rendered = without_crd_specs(template(helm, *values_args(value_set)).stdout)
    assert_golden(GOLDEN / f"{value_set}.yaml", rendered)


# --- values.schema.json --------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, named", [
    ("--set", "logLevel=verbose", "logLevel"),
    ("--set", "metrics.bogus=1", "bogus"),
    ("--set", "gpuHourPrice=-1", "gpuHourPrice"),
    ("--set", "image.pullPolicy=Sometimes", "pullPolicy"),
    ("--set", "watchNamespaces[0]=Not_A_Namespace", "watchNamespaces"),
    ("--set-string", "metrics.port=eighty", "port"),
    ("--set", "metrics.serviceMonitor.interval=often", "interval"),
])
def test_schema_rejects_a_bad_value_naming_it(helm, flag, value, named):
    out = template(helm, flag, value, check=False)
    assert out.returncode != 0, f"{value} was accepted"
    assert "schema" in out.stderr and named in out.stderr, out.stderr


def values_keys(values: dict, node: dict, schema: dict, prefix: str = "") -> list[str]:
    """Documented keys: descend into strict objects, stop at maps and lists."""
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    if isinstance(values, dict) and values and node.get("additionalProperties") is False:
        return [key for name, value in values.items()
                for key in values_keys(value, node["properties"][name], schema, f"{prefix}{name}.")]
    return [prefix.rstrip(".")]


def readme_section(title: str) -> str:
    readme = (CHART / "README.md").read_text()
    assert f"\n## {title}\n" in readme, f"the chart README has no '## {title}' section"
    return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(section: str) -> list[list[str]]:
    """Cells of the markdown table rows whose first cell is a code span."""
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith("`"):
            rows.append([c.strip("`") if i < 2 else c for i, c in enumerate(cells)])
    return rows


def test_every_value_is_in_the_schema_and_the_readme_table():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = set(values_keys(values, schema, schema))
    documented = {row[0] for row in table_rows(readme_section("Values"))}
    assert len(keys) > 40
    assert sorted(keys - documented) == [], "values missing from the README's table"
    assert sorted(documented - keys) == [], "the README documents values that do not exist"


# --- CRDs ----------------------------------------------------------------------------------------


def test_chart_crds_are_byte_identical_to_the_generated_crds():
    generated = {p.name: p.read_bytes() for p in (REPO_ROOT / "crds").glob("*.yaml")}
    in_chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert generated, "crds/ is empty"
    assert sorted(in_chart) == sorted(generated), "run: python -m finetune_api.generate"
    for name in generated:
        assert in_chart[name] == generated[name], f"charts/finetune-operator/crds/{name} is stale: run the generator"


def test_crds_are_not_templates_by_default(helm):
    assert find(render(helm), "CustomResourceDefinition") == []


@pytest.mark.parametrize("keep", [True, False])
def test_crds_as_templates_are_the_crd_files_with_a_keep_policy(helm, keep):
    rendered = render(helm, "--set", "crds.manageAsTemplates=true", "--set", f"crds.keep={str(keep).lower()}")
    crds = {c["metadata"]["name"]: c for c in find(rendered, "CustomResourceDefinition")}
    files = [yaml.safe_load(p.read_text()) for p in sorted((REPO_ROOT / "crds").glob("*.yaml"))]
    assert sorted(crds) == sorted(f["metadata"]["name"] for f in files)
    for f in files:
        crd = crds[f["metadata"]["name"]]
        assert crd["spec"] == f["spec"]
        annotations = crd["metadata"].get("annotations") or {}
        assert (annotations.get("helm.sh/resource-policy") == "keep") is keep
        assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "finetune-operator"


# --- the operator Deployment --------------------------------------------------------------------


def operator_container(objects: list[dict]) -> dict:
    return one(objects, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"][0]


def test_deployment_runs_restricted_replicas_with_the_configured_flags(helm):
    objects = render(helm, "--set", "watchNamespaces={team-a,team-b}", "--set", "logLevel=debug",
                     "--set", "gpuHourPrice=2.5")
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2  # one leads, one stands by (leader election)
    container = operator_container(objects)
    args = container["args"]
    for expected in ("--metrics-port=8080", "--liveness-port=8081", "--log-level=debug", "--gpu-hour-price=2.5",
                     "--trainer-image=ghcr.io/finetune-dev/finetune-trainer:0.1.0"):
        assert expected in args
    assert not [a for a in args if a.startswith("--vllm-image")], "the operator's default unless vllmImage is set"
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 65532
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_watching_every_namespace_passes_no_namespace_flag(helm):
    assert not [a for a in operator_container(render(helm))["args"] if a.startswith("--namespace")]


def test_every_object_carries_the_standard_labels(helm):
    for obj in render(helm, *values_args("namespaces-monitoring")):
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "version", "component", "part-of", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, f"{obj['kind']} {obj['metadata']['name']} lacks {key}"
        assert labels["helm.sh/chart"] == "finetune-operator-0.1.0"


def test_metrics_service_selects_the_operator_pod(helm):
    objects = render(helm)
    service = one(objects, "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# --- RBAC ----------------------------------------------------------------------------------------


def rules_file() -> dict[str, list[dict]]:
    return yaml.safe_load((CHART / "files" / "rbac" / "rules.yaml").read_text())


def flatten(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for r in rules for group in r["apiGroups"]
            for resource in r["resources"] for verb in r["verbs"]}


def test_watching_every_namespace_grants_the_rules_file_in_one_clusterrole(helm):
    objects = render(helm)
    # Only the leader-election Role, in the release namespace.
    assert [r["metadata"]["name"] for r in find(objects, "Role") + find(objects, "RoleBinding")] == [
        f"{FULLNAME}-leader-election"] * 2
    role = one(objects, "ClusterRole")
    assert flatten(role["rules"]) == flatten(rules_file()["namespaced"] + rules_file()["cluster"])
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}]


def test_watching_a_namespace_list_grants_a_role_per_namespace_and_only_cluster_reads(helm):
    objects = render(helm, "--set", "watchNamespaces={team-a,team-b}")
    assert flatten(one(objects, "ClusterRole")["rules"]) == flatten(rules_file()["cluster"])
    for namespace in ("team-a", "team-b"):
        role = one(objects, "Role", FULLNAME, namespace=namespace)
        assert flatten(role["rules"]) == flatten(rules_file()["namespaced"])
        binding = one(objects, "RoleBinding", FULLNAME, namespace=namespace)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"][0]["namespace"] == RELEASE_NAMESPACE


def test_two_replicas_elect_a_leader_roll_without_downtime_and_keep_one_through_a_drain(helm):
    objects = render(helm)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    args = operator_container(objects)["args"]
    assert "--leader-elect" in args and f"--leader-election-namespace={RELEASE_NAMESPACE}" in args
    assert f"--leader-election-id={FULLNAME}" in args
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # The Lease: create (cannot be limited by name), get and update of this release's one only.
    role = one(objects, "Role", namespace=RELEASE_NAMESPACE)
    assert sorted(flatten(role["rules"])) == [("coordination.k8s.io", "leases", "create"),
                                              ("coordination.k8s.io", "leases", "get"),
                                              ("coordination.k8s.io", "leases", "update")]
    assert [r.get("resourceNames") for r in role["rules"]] == [None, [FULLNAME]]
    binding = one(objects, "RoleBinding", namespace=RELEASE_NAMESPACE)
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_without_leader_election_one_replica_recreated_and_more_are_refused(helm):
    objects = render(helm, "--set", "leaderElection.enabled=false", "--set", "replicaCount=1")
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-elect" not in operator_container(objects)["args"]
    assert find(objects, "PodDisruptionBudget") == [] and find(objects, "Role") == []
    r = run_helm(helm, "template", "x", str(CHART), "--kube-version", kube_version(),
                 "--set", "leaderElection.enabled=false", check=False)
    assert r.returncode != 0 and "replicaCount > 1 needs leaderElection.enabled" in r.stderr


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_operator_cli_accepts_every_flag_the_chart_passes(helm, value_set):
    from finetune_operator.cli import build_parser

    args = operator_container(render(helm, *values_args(value_set)))["args"]
    parser = build_parser()
    try:
        parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"finetune-operator rejects the chart's arguments {args} (its error is printed above)")


def test_rbac_is_least_privilege():
    granted = flatten(sum(rules_file().values(), []))
    assert not {g for g, r, v in granted if "*" in (g, r, v)}, "no wildcards"
    assert {v for g, r, v in granted if r == "secrets"} == {"get"}, "secrets: get only, never list"
    assert not {r for _, r, _ in granted if r in ("pods/log", "pods/exec", "serviceaccounts/token")}
    assert not {v for _, r, v in granted if r == "pods"} - {"get", "list", "watch"}
    assert not {v for _, _, v in granted if v in ("escalate", "bind", "impersonate", "deletecollection")}
    cluster_scoped = flatten(rules_file()["cluster"])
    # TokenReview and SubjectAccessReview (the review page's authentication) store nothing.
    reviews = {("authentication.k8s.io", "tokenreviews", "create"),
               ("authorization.k8s.io", "subjectaccessreviews", "create")}
    assert {v for g, r, v in cluster_scoped if (g, r, v) not in reviews} <= {"get", "list", "watch"}, \
        "cluster-scoped access is read-only"


def test_operator_can_create_the_trainer_role_it_hands_out():
    """RBAC forbids granting what one does not hold: the trainer's Role gives `patch` on
    finetunejobs/status (and `get` on finetunejobs), so the operator must hold those too."""
    granted = flatten(rules_file()["namespaced"])
    for needed in [("finetune.dev", "finetunejobs/status", "patch"), ("finetune.dev", "finetunejobs", "get"),
                   ("rbac.authorization.k8s.io", "roles", "create"), ("rbac.authorization.k8s.io", "rolebindings", "create")]:
        assert needed in granted


def test_readme_rbac_table_lists_exactly_the_granted_verbs():
    """The table's rows: | resource | API group | verbs | why |."""
    documented = set()
    for resource, group, verbs, *_why in table_rows(readme_section("RBAC")):
        group = "" if group == "core" else group
        documented |= {(group, resource, verb.strip(" `")) for verb in verbs.split(",")}
    assert documented == flatten(sum(rules_file().values(), []))


# --- the OpenAI-compatible API (openaiApi) -------------------------------------------------------------

OPENAI_API = f"{FULLNAME}-openai-api"
OPENAI_ON = ["--set", "openaiApi.enabled=true", "--set", "openaiApi.filesClaim=openai-share"]


def test_openai_api_is_off_by_default(helm):
    for obj in render(helm):
        assert obj["metadata"]["labels"].get("app.kubernetes.io/component") != "openai-api", obj["metadata"]["name"]


def test_openai_api_needs_a_files_claim(helm):
    out = template(helm, "--set", "openaiApi.enabled=true", check=False)
    assert out.returncode != 0 and "openaiApi.filesClaim" in out.stderr


def test_openai_api_has_its_own_least_privilege_identity(helm):
    objects = render(helm, *OPENAI_ON)
    cluster_rules = flatten(one(objects, "ClusterRole", OPENAI_API)["rules"])
    assert cluster_rules == {
        ("finetune.dev", "finetunejobs", "get"), ("finetune.dev", "finetunejobs", "list"),
        ("finetune.dev", "finetunejobs", "create"), ("finetune.dev", "finetunejobs", "patch"),
        ("finetune.dev", "inferenceservices", "get"), ("", "events", "list"),
        ("authentication.k8s.io", "tokenreviews", "create"), ("authorization.k8s.io", "subjectaccessreviews", "create")}
    role = one(objects, "Role", OPENAI_API, RELEASE_NAMESPACE)
    assert flatten(role["rules"]) == {("", "secrets", "get")}, "API keys: get by name in the release namespace only"
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        binding = one(objects, kind, OPENAI_API)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPENAI_API, "namespace": RELEASE_NAMESPACE}]
    pod = one(objects, "Deployment", OPENAI_API)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == OPENAI_API and pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["image"].startswith("ghcr.io/finetune-dev/finetune-trainer:"), "the image with the validator"
    deployment = one(objects, "Deployment", OPENAI_API)
    selector = one(objects, "Service", OPENAI_API)["spec"]["selector"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert selector["app.kubernetes.io/component"] == "openai-api"  # the operator's metrics Service skips it


def test_openai_api_readme_table_lists_exactly_its_rules(helm):
    objects = render(helm, *OPENAI_ON)
    granted = flatten(one(objects, "ClusterRole", OPENAI_API)["rules"] + one(objects, "Role", OPENAI_API)["rules"])
    documented = set()
    for resource, group, verbs, *_why in table_rows(readme_section("OpenAI-compatible API")):
        group = "" if group == "core" else group
        documented |= {(group, resource.split(" ")[0].strip("`"), verb.strip(" `")) for verb in verbs.split(",")}
    assert documented == granted


@pytest.mark.parametrize("value_set", ["namespaces-monitoring"])
def test_openai_api_cli_accepts_every_flag_the_chart_passes(helm, value_set):
    from finetune_openai.cli import _parser

    objects = render(helm, *values_args(value_set))
    container = one(objects, "Deployment", OPENAI_API)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "finetune_openai"]
    args = _parser().parse_args(container["args"])
    assert (args.files_claim, args.keys_namespace, args.max_running_jobs) == ("openai-files", RELEASE_NAMESPACE, 2)
    config = yaml.safe_load(one(objects, "ConfigMap", OPENAI_API)["data"]["models.yaml"])
    assert config == {"llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct"}
    template = yaml.safe_load(one(objects, "ConfigMap", OPENAI_API)["data"]["job-template.yaml"])
    assert template["method"] == {"type": "lora", "lora": {"r": 16}}


# --- monitoring ------------------------------------------------------------------------------------

MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
ALL_MONITORING_ON = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true",
                     "--set", "metrics.prometheusRule.enabled=true"]


def test_monitoring_objects_need_the_prometheus_operator_api_or_force(helm):
    kinds = lambda objects: sorted({o["kind"] for o in objects if o["kind"] in MONITORING_KINDS})  # noqa: E731
    assert kinds(render(helm, *ALL_MONITORING_ON)) == []
    assert kinds(render(helm, *ALL_MONITORING_ON, "--api-versions", "monitoring.coreos.com/v1")) == sorted(MONITORING_KINDS)
    forced = render(helm, *ALL_MONITORING_ON, "--set", "metrics.podMonitor.force=true")
    assert kinds(forced) == ["PodMonitor"]


def test_podmonitors_select_trainer_and_vllm_pods_by_the_operator_labels(helm):
    from finetune_operator.builders import trainer_config
    from finetune_operator.serving import common
    from finetune_operator.labels import COMPONENT, FINETUNEJOB, MANAGED_BY, APP

    monitors = {m["metadata"]["name"]: m for m in find(render(helm, *values_args("namespaces-monitoring")), "PodMonitor")}
    trainer, vllm = monitors[f"{FULLNAME}-trainer"]["spec"], monitors[f"{FULLNAME}-inference"]["spec"]
    assert trainer["selector"]["matchLabels"] == {MANAGED_BY: APP, COMPONENT: trainer_config.COMPONENT}
    assert vllm["selector"]["matchLabels"] == {MANAGED_BY: APP, COMPONENT: common.COMPONENT_NAME}
    assert trainer["podMetricsEndpoints"][0]["port"] == "metrics"
    assert vllm["podMetricsEndpoints"][0]["port"] == common.PORT_NAME
    assert vllm["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert trainer["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    relabeled = {r["sourceLabels"][0] for r in trainer["podMetricsEndpoints"][0]["relabelings"]}
    assert "__meta_kubernetes_pod_label_" + re.sub(r"[./-]", "_", FINETUNEJOB) in relabeled
    relabeled = {r["sourceLabels"][0] for r in vllm["podMetricsEndpoints"][0]["relabelings"]}
    assert "__meta_kubernetes_pod_label_" + re.sub(r"[./-]", "_", common.INFERENCESERVICE_LABEL) in relabeled


def test_dashboard_configmap_is_labelled_for_grafana_and_holds_the_dashboard(helm):
    assert find(render(helm), "ConfigMap") == []
    configmap = one(render(helm, "--set", "dashboards.enabled=true"), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["finetune-operator.json"])
    assert dashboard == json.loads((CHART / "files" / "dashboard.json").read_text())


def test_alert_rules_cover_the_failure_modes(helm):
    rule = one(render(helm, *values_args("namespaces-monitoring")), "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert sorted(alerts) == sorted(["FineTuneOperatorDown", "FineTuneJobFailed", "FineTuneJobStuckPending",
                                     "FineTuneJobNoProgress", "FineTuneJobLossNaN", "InferenceServiceNotReady",
                                     "VLLMQueueBuildingUp"])
    # Only the operator being down pages; a user's failed or diverged job does not.
    assert [a for a, r in alerts.items() if r["labels"]["severity"] == "critical"] == ["FineTuneOperatorDown"]
    assert "20m" in alerts["FineTuneJobNoProgress"]["expr"]  # noProgressMinutes from values
    assert alerts["FineTuneJobStuckPending"]["for"] == "15m"
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


# Metric names: every name the dashboard and the alerts query must be exported by the code.

# vLLM's names, as the dashboard and alerts use them. vLLM is not imported here (that takes
# a minute and a model); test_vllm_metric_names_exist_in_the_installed_vllm checks them
# against the installed vLLM's metric definitions instead. name -> Prometheus type.
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}
# Prometheus's own series, present for every scrape target.
PROMETHEUS_BUILTINS = {"up"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "info": ("_info",), "unknown": ("",)}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan", "atan2"}


def exposed_names(families) -> set[str]:
    """Sample names prometheus_client exposes for metric families (with or without children)."""
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


@cache
def exported_metric_names() -> frozenset[str]:
    from finetune_operator import metrics as operator_metrics
    from finetune_trainer.reporting import Metrics as TrainerMetrics

    operator_families = list(operator_metrics.registry.collect())
    names = exposed_names(operator_families) | exposed_names(TrainerMetrics(None).registry.collect())
    # METRIC_NAMES, the operator's own list, names families (counters with their _total).
    assert set(operator_metrics.METRIC_NAMES) <= names | {f.name for f in operator_families}
    vllm = {name + suffix for name, kind in VLLM_METRICS.items() for suffix in SUFFIXES[kind]}
    return frozenset(names | vllm | PROMETHEUS_BUILTINS)


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression (or a Grafana label_values() query) selects."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    expr = re.sub(r"\{[^{}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+-?[0-9a-z]+", "", expr)
    expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr.strip())
    expr = re.sub(r"^label_values\(\s*\w+\s*\)$", "", expr)
    tokens = re.findall(r"(?<![\w:.$])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:])(?!\s*\()", expr)
    return {t for t in tokens if t.lower() not in PROMQL_WORDS}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


def alert_queries(helm) -> list[str]:
    rule = one(render(helm, *values_args("namespaces-monitoring")), "PrometheusRule")
    return [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]


def test_dashboard_and_alerts_use_only_exported_metric_names(helm):
    queries = dashboard_queries() + alert_queries(helm)
    used = set().union(*map(metric_names_in, queries))
    assert {"finetune_trainer_loss", "vllm:num_requests_waiting", "finetune_operator_jobs"} <= used
    unknown = sorted(used - exported_metric_names())
    assert unknown == [], f"queried but never exported: {unknown}"


def test_metric_name_extraction_reads_promql():
    expr = ('histogram_quantile(0.95, sum by (le, namespace) (rate(vllm:time_to_first_token_seconds_bucket'
            '{namespace=~"$namespace", x="a b"}[$__rate_interval]))) / on (namespace) group_left '
            'foo_total offset 5m and abs(bar) == +Inf')
    assert metric_names_in(expr) == {"vllm:time_to_first_token_seconds_bucket", "foo_total", "bar"}
    assert metric_names_in('label_values(finetune_trainer_step{namespace=~"$namespace"}, finetunejob)') == {
        "finetune_trainer_step"}
    assert metric_names_in("label_values(namespace)") == set()


def test_dashboard_and_alert_queries_are_valid_promql(helm):
    promql = pytest.importorskip("promql_parser", reason="promql-parser (pip) checks the PromQL syntax")
    grafana = {"$__rate_interval": "5m", "$__range": "6h", "$namespace": ".*", "$finetunejob": ".*",
               "$inferenceservice": ".*"}
    for query in dashboard_queries() + alert_queries(helm):
        if query.startswith("label_values("):
            continue
        for variable, value in grafana.items():
            query = query.replace(variable, value)
        promql.parse(query)


def test_vllm_metric_names_exist_in_the_installed_vllm():
    """The names above against the installed vLLM's metric definitions (its Prometheus
    stat logger), name and type. A live scrape would need a model server for a minute."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed (make install adds its CPU build)")
    source = "\n".join(p.read_text() for p in Path(spec.submodule_search_locations[0], "v1", "metrics").glob("*.py"))
    defined = {name: kind for kind, name in
               re.findall(r"_(gauge|counter|histogram)_cls\(\s*name=\"(vllm:[a-z0-9_]+)\"", source)}
    assert defined, "vLLM's metric definitions moved: update this test"
    for name, kind in VLLM_METRICS.items():
        assert defined.get(name) == kind, f"{name}: vLLM defines {defined.get(name)!r}, the dashboard assumes {kind}"


# --- Argo CD health checks --------------------------------------------------------------------------

ARGOCD = CHART / "files" / "argocd"


def test_readme_carries_the_argocd_health_checks():
    readme = (CHART / "README.md").read_text()
    for kind in ("finetunejob", "inferenceservice"):
        script = (ARGOCD / f"{kind}.lua").read_text()
        indented = "\n".join(("    " + line) if line else "" for line in script.rstrip("\n").splitlines())
        assert indented in readme, f"README's Argo CD snippet differs from files/argocd/{kind}.lua"


def _health(kind: str, obj: dict) -> dict:
    lupa = pytest.importorskip("lupa", reason="lupa (pip) runs the Argo CD Lua health checks")
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value
    lua.globals().obj = to_lua(obj)
    result = lua.execute((ARGOCD / f"{kind}.lua").read_text())
    return {"status": result["status"], "message": result["message"]}


def _resource(phase: str | None, conditions=(), generation=1, observed=1, **status) -> dict:
    body = {"metadata": {"name": "x", "generation": generation}}
    if phase is not None:
        body["status"] = {"phase": phase, "observedGeneration": observed, "conditions": list(conditions), **status}
    return body


@pytest.mark.parametrize("phase, health", [
    ("Succeeded", "Healthy"), ("Pending", "Progressing"), ("Validating", "Progressing"),
    ("Training", "Progressing"), ("Evaluating", "Progressing"), ("Deploying", "Progressing"),
    ("Failed", "Degraded"), ("Suspended", "Suspended"),
])
def test_argocd_health_of_a_finetunejob_follows_its_phase(phase, health):
    assert _health("finetunejob", _resource(phase))["status"] == health


def test_argocd_health_explains_a_failed_finetunejob_with_its_condition():
    failed = _resource("Failed", [{"type": "Failed", "status": "True", "reason": "InvalidDataset",
                                   "message": "dataset line 41: field \"output\" is missing"}])
    assert _health("finetunejob", failed) == {
        "status": "Degraded", "message": "Failed: dataset line 41: field \"output\" is missing"}
    training = _resource("Training", progress={"percent": 40})
    assert _health("finetunejob", training)["message"].endswith("(40%)")


def test_argocd_health_waits_for_the_operator_to_observe_the_spec():
    assert _health("finetunejob", _resource(None))["status"] == "Progressing"
    stale = _resource("Succeeded", generation=3, observed=2)
    assert _health("finetunejob", stale) == {"status": "Progressing",
                                             "message": "Waiting for the operator to observe generation 3"}


@pytest.mark.parametrize("phase, health", [
    ("Ready", "Healthy"), ("Pending", "Progressing"), ("Progressing", "Progressing"),
    ("Degraded", "Degraded"), ("Failed", "Degraded"),
])
def test_argocd_health_of_an_inferenceservice_follows_its_phase(phase, health):
    conditions = [{"type": "Degraded", "status": "True", "reason": "CrashLoop", "message": "vLLM exits: out of memory"}]
    result = _health("inferenceservice", _resource(phase, conditions))
    assert result["status"] == health
    if health == "Degraded":
        assert result["message"] == f"{phase}: vLLM exits: out of memory"


# --- the operator image -----------------------------------------------------------------------------


def test_operator_image_is_slim_and_runs_as_the_charts_non_root_user():
    dockerfile = (REPO_ROOT / "operator.Dockerfile").read_text()
    # The published base (`make images` swaps BASE_IMAGE for a Debian one when offline).
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim\s*$", dockerfile, re.M)
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    install = [line for line in dockerfile.splitlines() if "pip install" in line or "pip wheel" in line]
    assert install and not any("[" in line for line in install), "the trainer extra must not be installed"
    assert re.search(r"^USER 65532(:65532)?$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["finetune-operator"\]$', dockerfile, re.M)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["metrics"]["port"] == 8080 and values["health"]["port"] == 8081
    assert "EXPOSE 8080 8081" in dockerfile


# --- a real install into the local control plane -------------------------------------------------------


@pytest.fixture
def release(cluster, namespace, helm):
    """Installs into `namespace`, watching only it (a cluster-wide install would collide
    with other tests' namespaces and cluster-scoped names). Uninstalled at the end."""
    env = cluster.env()

    def helm_run(*args, check=True):
        return run_helm(helm, *args, f"--kubeconfig={cluster.kubeconfig}", check=check, env=env)
    yield helm_run
    helm_run("uninstall", RELEASE, "-n", namespace, "--wait", check=False)


def _deployment(cluster, namespace, name):
    return get_json(cluster, "deployment", name, "-n", namespace)


@pytest.mark.cluster
def test_install_upgrade_uninstall_against_a_real_api_server(cluster, namespace, release):
    name = f"fo-{namespace}"  # ClusterRoles are cluster-wide: one name per test namespace
    common = [RELEASE, str(CHART), "-n", namespace, "--set", f"watchNamespaces={{{namespace}}}",
              "--set", f"fullnameOverride={name}"]
    # given a fresh install
    notes = release("install", *common).stdout
    assert "kubectl get ftj -A" in notes and f"It watches the namespaces: {namespace}." in notes
    assert get_json(cluster, "crd", "finetunejobs.finetune.dev")["spec"]["names"]["shortNames"] == ["ftj"]
    args = _deployment(cluster, namespace, name)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--log-level=info" in args and f"--namespace={namespace}" in args
    assert get_json(cluster, "role", name, "-n", namespace)["rules"]
    cluster.kubectl("get", "serviceaccount", name, "-n", namespace)
    cluster.kubectl("get", "service", f"{name}-metrics", "-n", namespace)
    cluster.kubectl("get", "ftj", "-n", namespace)  # the CRD is served

    # then its ServiceAccount may do what files/rbac/rules.yaml grants, and no more
    def can(verb, resource, *scope):
        """`kubectl auth can-i` as the operator's ServiceAccount (in `namespace` unless told)."""
        if not any(s.startswith(("-n", "--all-namespaces")) for s in scope):
            scope = (*scope, "-n", namespace)
        out = cluster.kubectl("auth", "can-i", verb, resource, *scope,
                              f"--as=system:serviceaccount:{namespace}:{name}", check=False)
        return out.stdout.strip() == "yes"
    assert can("patch", "finetunejobs.finetune.dev") and can("patch", "finetunejobs.finetune.dev", "--subresource=status")
    assert can("create", "jobs.batch") and can("create", "roles.rbac.authorization.k8s.io")
    assert can("get", "secrets") and not can("list", "secrets")
    assert not can("get", "pods", "--subresource=log") and not can("create", "pods")
    assert not can("list", "finetunejobs.finetune.dev", "-n", "default"), "only the watched namespace"
    assert can("list", "nodes", "--all-namespaces") and not can("delete", "nodes", "--all-namespaces")

    # when upgraded with another log level, the Deployment changes
    generation = _deployment(cluster, namespace, name)["metadata"]["generation"]
    release("upgrade", *common, "--set", "logLevel=debug")
    deployment = _deployment(cluster, namespace, name)
    assert deployment["metadata"]["generation"] > generation
    assert "--log-level=debug" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    # when uninstalled, no operator object is left; the CRDs stay (Helm never deletes crds/)
    release("uninstall", RELEASE, "-n", namespace, "--wait")
    wait_for(lambda: cluster.kubectl("get", "deployment,service,serviceaccount,role,rolebinding,pods", "-n", namespace,
                                     "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name").stdout.strip() == "",
             timeout=60, what="the release's namespaced objects and pods to be deleted")
    for kind in ("clusterrole", "clusterrolebinding"):
        assert cluster.kubectl("get", kind, name, check=False).returncode != 0, f"{kind} {name} was left behind"
    cluster.kubectl("get", "crd", "finetunejobs.finetune.dev", "inferenceservices.finetune.dev")


def test_capacity_policy_log_format_and_lease_timings_reach_the_operator(helm):
    from finetune_operator.cli import build_parser

    defaults = build_parser().parse_args(operator_container(render(helm))["args"])
    assert (defaults.capacity_policy, defaults.log_format) == ("wait", "json")
    args = operator_container(render(
        helm, "--set", "capacityPolicy=fail", "--set", "logFormat=text",
        "--set", "leaderElection.leaseDuration=30", "--set", "leaderElection.renewDeadline=20",
        "--set", "leaderElection.retryPeriod=4"))["args"]
    parsed = build_parser().parse_args(args)
    assert (parsed.capacity_policy, parsed.log_format) == ("fail", "text")
    assert (parsed.leader_election_lease_duration, parsed.leader_election_renew_deadline,
            parsed.leader_election_retry_period) == (30, 20, 4)
    r = run_helm(helm, "template", "x", str(CHART), "--kube-version", kube_version(),
                 "--set", "capacityPolicy=sometimes", check=False)
    assert r.returncode != 0 and "capacityPolicy" in r.stderr


def test_openai_api_with_object_storage_needs_no_claim_and_may_read_only_the_named_secret(helm):
    from finetune_openai.cli import _parser

    objects = render(helm, *OPENAI_ON, "--set", "openaiApi.filesClaim=", "--set",
                     "openaiApi.filesStore.uri=s3://uploads/openai", "--set",
                     "openaiApi.filesStore.endpoint=http://minio.storage:9000")
    deployment = one(objects, "Deployment", OPENAI_API)["spec"]["template"]["spec"]
    args = _parser().parse_args(deployment["containers"][0]["args"])
    assert (args.files_store, args.files_store_secret, args.files_store_endpoint) == (
        "s3://uploads/openai", "finetune-object-storage", "http://minio.storage:9000")
    assert not any("persistentVolumeClaim" in v for v in deployment["volumes"])
    secrets = [r for r in one(objects, "ClusterRole", OPENAI_API)["rules"] if "secrets" in r["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["finetune-object-storage"],
                        "verbs": ["get"]}]
    # Without filesStore the API reads no Secret outside its release namespace.
    plain = render(helm, *OPENAI_ON)
    assert not [r for r in one(plain, "ClusterRole", OPENAI_API)["rules"] if "secrets" in r["resources"]]


def test_the_operator_has_startup_readiness_and_liveness_probes_on_its_event_loop_check(helm):
    container = operator_container(render(helm))
    probes = {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe in probes.values():
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    # The startup probe gives a slow start (listing thousands of jobs) minutes, then hands over
    # to liveness, which no longer needs an initial delay.
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert probes["livenessProbe"]["initialDelaySeconds"] == 0
    assert probes["readinessProbe"]["failureThreshold"] >= 2
