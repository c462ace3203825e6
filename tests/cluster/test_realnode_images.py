"""The real node (`FINETUNE_NODE=kubelet`): the project's own images run under a kubelet.

containerd, runc, a kubelet and kube-proxy run the pods bound to `local`; the images come
from `make images` (buildah, Debian bases, no registry) and are imported into containerd.
These tests check what the stand-in agent could not: the image's entrypoint, user and
PYTHONPATH, a read-only root, probes, pod IPs, Services and their endpoints, and the
operator installed with its Helm chart running from the operator image.

They need root, cgroups and iptables (the dev machine and CI have them); one real node
runs per machine at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from finetune_devcluster.cluster import REPO_ROOT, Cluster
from finetune_devcluster.realnode import not_cached
from tests.fixtures.cluster import get_json, wait_for


def _why_not_here() -> str | None:
    """With FINETUNE_NODE=kubelet these tests build what is missing (a cold `make node images`
    is over an hour: never CI's default). Otherwise they run when nothing needs building (the
    node's binaries, runc, the pause and operator images cached for these sources: ~2 min),
    and are skipped with the reason when not."""
    node = os.environ.get("FINETUNE_NODE")
    if node == "kubelet":
        return None
    if node:
        return f"FINETUNE_NODE={node}: the real node's tests run by default or with FINETUNE_NODE=kubelet"
    reason = not_cached("operator")
    return reason and (f"{reason}: the real node's tests run when nothing needs building, or with "
                       "FINETUNE_NODE=kubelet, which builds it (docs/real-node.md)")


WHY_NOT_HERE = _why_not_here()
pytestmark = [pytest.mark.cluster, pytest.mark.slow,
              pytest.mark.timeout(2400),  # with FINETUNE_NODE=kubelet the first run builds the images
              pytest.mark.skipif(WHY_NOT_HERE is not None, reason=WHY_NOT_HERE or "")]

LOCAL = {"nodeSelector": {"finetune.dev/local-node": "true"},
         "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists", "effect": "NoSchedule"}]}
RESTRICTED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("realnode"), node="kubelet", images=("operator",))
    c.start(timeout=300)
    yield c
    c.stop()


@pytest.fixture
def ns(real_cluster: Cluster):
    import uuid

    name = f"rn-{uuid.uuid4().hex[:6]}"
    real_cluster.kubectl("create", "namespace", name)
    # Restricted Pod Security: the pods below must pass it as they are.
    real_cluster.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    wait_for(lambda: real_cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
             timeout=30, what="default ServiceAccount")
    yield name
    real_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _apply(c: Cluster, ns: str, *docs: dict) -> None:
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                              "items": list(docs)}))


def _ready(c: Cluster, ns: str, pod: str) -> dict | None:
    p = get_json(c, "pod", pod, "-n", ns)
    ok = any(x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions", []))
    return p if ok else None


def _http(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


def test_node_is_a_real_kubelet_with_containerd(real_cluster: Cluster):
    node = get_json(real_cluster, "node", "local")
    info = node["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://2."), info
    pinned = dict(line.split("=", 1) for line in (REPO_ROOT / "hack" / "versions.env").read_text().splitlines()
                  if "=" in line and not line.startswith("#"))
    assert info["kubeletVersion"] == pinned["KUBERNETES_VERSION"], info
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == real_cluster.host_ip != "127.0.0.1"


def test_operator_image_pod_gets_its_own_ip_and_a_service(real_cluster: Cluster, ns: str):
    c = real_cluster
    image = c.image_refs["operator"]
    # The image's own Python (its venv first on PATH) serves a directory: read-only root,
    # the image's non-root user, a readiness probe the kubelet runs against the pod's IP.
    server = ("import http.server, os, socketserver\n"
              "open('/scratch/uid', 'w').write(str(os.getuid()))\n"
              "h = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory='/scratch', **k)\n"
              "socketserver.TCPServer(('', 8080), h).serve_forever()\n")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}},
           "spec": {**LOCAL, "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "web", "image": image, "imagePullPolicy": "Never",
                        "command": ["python", "-c", server],
                        "securityContext": RESTRICTED,
                        "ports": [{"containerPort": 8080, "name": "http"}],
                        "readinessProbe": {"httpGet": {"path": "/uid", "port": "http"}, "periodSeconds": 1},
                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
                    "volumes": [{"name": "scratch", "emptyDir": {}}]}}
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}}
    _apply(c, ns, pod, svc)
    p = wait_for(lambda: _ready(c, ns, "web"), timeout=120, what="pod web Ready (readiness probe)")
    ip = p["status"]["podIP"]
    assert ip.startswith("10.88."), p["status"]
    assert p["spec"]["nodeName"] == "local"
    # The host reaches the pod at its own IP; the process ran as the image's user (65532).
    assert _http(f"http://{ip}:8080/uid") == (200, "65532")
    # The Service's endpoints are the pod's IP, and kube-proxy routes its ClusterIP.
    def endpoints():
        slices = get_json(c, "endpointslices", "-n", ns, "-l", "kubernetes.io/service-name=web")["items"]
        return [a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"]]
    assert wait_for(endpoints, timeout=30, what="EndpointSlice of Service web") == [ip]
    cluster_ip = get_json(c, "service", "web", "-n", ns)["spec"]["clusterIP"]
    assert wait_for(lambda: _http(f"http://{cluster_ip}/uid"), timeout=30,
                    what=f"Service web at {cluster_ip}") == (200, "65532")
    # The root filesystem is read-only; exec goes API server -> kubelet -> containerd.
    out = c.kubectl("exec", "-n", ns, "web", "--", "python", "-c",
                    "import os\ntry:\n open('/x','w')\nexcept OSError as e:\n print(e.errno)", check=False)
    assert out.returncode == 0 and out.stdout.strip() == "30", out  # EROFS


def test_operator_runs_from_its_image_installed_by_helm(real_cluster: Cluster, tmp_path: Path):
    c = real_cluster
    repo, tag = c.image_refs["operator"].rsplit(":", 1)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
        "nodeSelector": LOCAL["nodeSelector"], "tolerations": LOCAL["tolerations"]}))
    c.kubectl("create", "namespace", "finetune-system")
    out = subprocess.run([str(c.bin_dir / "helm"), "install", "finetune-operator",
                          str(REPO_ROOT / "charts" / "finetune-operator"), "-n", "finetune-system",
                          "-f", str(values), "--wait", "--timeout=180s"],
                         env=c.env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr + c.kubectl("describe", "pods", "-n", "finetune-system").stdout
    pods = get_json(c, "pods", "-n", "finetune-system", "-l", "app.kubernetes.io/name=finetune-operator")["items"]
    # The chart's default: two replicas, one leads (holds the Lease), one stands by.
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2 and all(ip.startswith("10.88.") for ip in ips), ips
    assert all(p["spec"]["nodeName"] == "local" for p in pods)
    # They reached the API server through the `kubernetes` Service (kube-proxy) with their
    # ServiceAccount: one of them took the Lease, named by its pod name (its hostname).
    def leader():
        leases = get_json(c, "leases", "-n", "finetune-system")["items"]
        holders = [(lease["spec"] or {}).get("holderIdentity") or "" for lease in leases]
        return next((p for p in pods for h in holders if h.startswith(p["metadata"]["name"] + "_")), None)
    p = wait_for(leader, timeout=90, what="an operator replica holding the leader Lease")
    logs = c.kubectl("logs", "-n", "finetune-system", p["metadata"]["name"]).stdout
    assert "Traceback" not in logs, logs
    for pod in pods:
        status = pod["status"]["containerStatuses"][0]
        assert status["ready"] and status["restartCount"] == 0, status
    # The chart's securityContext holds in the image: its user, a read-only root.
    out = c.kubectl("exec", "-n", "finetune-system", p["metadata"]["name"], "--", "python", "-c",
                    "import os\ntry:\n open('/x','w')\nexcept OSError as e:\n print(os.getuid(), e.errno)",
                    check=False)
    assert out.returncode == 0 and out.stdout.split() == ["65532", "30"], out  # EROFS
    metrics_port = next(port["containerPort"] for port in p["spec"]["containers"][0]["ports"]
                        if port["name"] == "metrics")
    code, body = _http(f"http://{p['status']['podIP']}:{metrics_port}/metrics")
    assert code == 200 and "finetune" in body


def test_trainer_image_runs_as_uid_1000_and_writes_a_checkpoint_to_the_claim(real_cluster: Cluster, ns: str):
    """The trainer image (torch with its CUDA wheels; no GPU here, so on CPU) under the pod
    spec the operator gives trainer pods: the image's user (1000), fsGroup, a read-only
    root; it saves a (tiny, randomly initialised) model with transformers to a claim from
    the dev cluster's StorageClass, and the files on the volume belong to UID 1000."""
    from finetune_devcluster.realnode import build_images

    if os.environ.get("FINETUNE_NODE") != "kubelet":
        pytest.skip("importing the trainer image takes ~2 min: with FINETUNE_NODE=kubelet only "
                    "(tests/e2e/test_realnode_demo.py runs the trainer image too)")

    c = real_cluster
    ref, archive = build_images("trainer")["trainer"]
    c.real_node.import_images([archive])
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "work"},
           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    script = (
        "import os, errno, torch, transformers, finetune_trainer\n"
        "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,\n"
        "    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)\n"
        "transformers.LlamaForCausalLM(cfg).save_pretrained('/workspace/checkpoints/checkpoint-1')\n"
        "try:\n open('/opt/x', 'w')\nexcept OSError as e:\n rofs = e.errno == errno.EROFS\n"
        "print('RESULT', os.getuid(), os.getgid(), sorted(os.getgroups()), rofs, torch.__version__)\n")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trainer"},
           "spec": {**LOCAL, "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True, "fsGroup": 1000,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "trainer", "image": ref, "imagePullPolicy": "Never",
                        "command": ["python", "-c", script], "securityContext": RESTRICTED,
                        "volumeMounts": [{"name": "work", "mountPath": "/workspace"},
                                         {"name": "tmp", "mountPath": "/tmp"}]}],
                    "volumes": [{"name": "work", "persistentVolumeClaim": {"claimName": "work"}},
                                {"name": "tmp", "emptyDir": {}}]}}
    _apply(c, ns, pvc, pod)

    def finished():
        p = get_json(c, "pod", "trainer", "-n", ns)
        return p if p["status"].get("phase") in ("Succeeded", "Failed") else None
    p = wait_for(finished, timeout=300, what="trainer pod finished")
    logs = c.kubectl("logs", "-n", ns, "trainer").stdout
    assert p["status"]["phase"] == "Succeeded", logs
    result = next(line.split()[1:] for line in logs.splitlines() if line.startswith("RESULT"))
    uid, gid, groups, rofs, torch_version = result[0], result[1], result[2:-2], result[-2], result[-1]
    assert (uid, gid, rofs) == ("1000", "1000", "True"), logs
    assert "1000" in "".join(groups), logs  # fsGroup among the supplementary groups
    assert torch_version.startswith("2."), logs
    # The files are on the claim's volume on this machine, owned by the image's user.
    pv = get_json(c, "pvc", "work", "-n", ns)["spec"]["volumeName"]
    root = Path(get_json(c, "pv", pv)["spec"]["hostPath"]["path"]) / "checkpoints" / "checkpoint-1"
    files = {f.name: f.stat().st_uid for f in root.iterdir()}
    assert "model.safetensors" in files and "config.json" in files, files
    assert set(files.values()) == {1000}, files
