"""The OpenAI-compatible fine-tuning API as a local process against the dev cluster.

What `make demo` and the tests share: the chart's ServiceAccount and RBAC for the API
(rendered with `openaiApi.enabled`), a kubeconfig with that ServiceAccount's token (the API
never runs with the admin credential), the files claim `openai-files` in the namespace the
API serves (its hostPath folder is linked into the API's files folder, as the shared claim is
in a cluster), the base model copied onto that claim, the process, and an API key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from .cluster import REPO_ROOT, Cluster, _kill_group

FILES_CLAIM = "openai-files"
BASE_MODEL = "tiny-llama"
COMPONENT = "app.kubernetes.io/component"


class LocalOpenAIApi:
    def __init__(self, cluster: Cluster, state_dir: Path, *, namespace: str, release: str,
                 release_namespace: str, port: int, job_template: dict, extra_args: tuple[str, ...] = (),
                 files_store: str | None = None) -> None:
        self.cluster = cluster
        self.state_dir = state_dir
        self.namespace = namespace
        self.release = release
        self.release_namespace = release_namespace
        self.port = port
        self.job_template = job_template
        self.extra_args = list(extra_args)
        # s3://bucket/prefix on the cluster's object store instead of the files claim (uploads);
        # the claim still holds the base model.
        self.files_store = files_store
        self.files_dir = state_dir / "openai-files"
        self.log = state_dir / "openai-api.log"
        self.process: subprocess.Popen | None = None
        self.cluster_objects: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def kubectl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, **kw)

    def install_rbac(self) -> str:
        """Apply the chart's API ServiceAccount and RBAC; return a kubeconfig with its token."""
        version = json.loads(self.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
        rendered = subprocess.run(
            [str(self.cluster.bin_dir / "helm"), "template", self.release, str(REPO_ROOT / "charts" / "finetune-operator"),
             "--namespace", self.release_namespace, "--skip-crds", "--kube-version", version,
             "--set", "openaiApi.enabled=true", "--set", "openaiApi.filesClaim=unused-locally",
             *(["--set", f"openaiApi.filesStore.uri={self.files_store}"] if self.files_store else [])],
            check=True, capture_output=True, text=True).stdout
        docs = [d for d in yaml.safe_load_all(rendered) if d and d["metadata"].get("labels", {}).get(COMPONENT) == "openai-api"
                and d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
        self.kubectl("create", "namespace", self.release_namespace, check=False)
        self.kubectl("apply", "-n", self.release_namespace, "-f", "-",
                     input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        self.cluster_objects = [(d["kind"].lower(), d["metadata"]["name"]) for d in docs
                                if d["kind"].startswith("Cluster")]
        sa = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
        token = self.kubectl("create", "token", sa, "-n", self.release_namespace, "--duration=24h").stdout.strip()
        kubeconfig = self.state_dir / "openai-api.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "api",
            "clusters": [{"name": "local", "cluster": {"server": self.cluster.server,
                                                       "certificate-authority": str(self.cluster.pki / "ca.crt")}}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{"name": "api", "context": {"cluster": "local", "user": sa}}]}))
        kubeconfig.chmod(0o600)
        return str(kubeconfig)

    def prepare_files_claim(self, model_dir: Path) -> Path:
        """The claim jobs read uploads (and the base model) from, linked into the files folder."""
        self.kubectl("create", "namespace", self.namespace, check=False)
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": FILES_CLAIM},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}}}))
        self.kubectl("wait", "-n", self.namespace, "--for=jsonpath={.status.phase}=Bound", f"pvc/{FILES_CLAIM}",
                     "--timeout=60s")
        pv = self.kubectl("get", "pvc", FILES_CLAIM, "-n", self.namespace, "-o", "jsonpath={.spec.volumeName}").stdout
        root = Path(self.kubectl("get", "pv", pv, "-o", "jsonpath={.spec.hostPath.path}").stdout)
        shutil.copytree(model_dir, root / "models" / BASE_MODEL, dirs_exist_ok=True)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        link = self.files_dir / self.namespace
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(root, target_is_directory=True)
        return root

    def start(self, model_dir: Path, timeout: float = 60) -> "LocalOpenAIApi":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        kubeconfig = self.install_rbac()
        self.prepare_files_claim(model_dir)
        template = self.state_dir / "openai-job-template.yaml"
        template.write_text(yaml.safe_dump(self.job_template))
        out = open(self.log, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator", "api", "--host", "127.0.0.1", "--port", str(self.port),
             "--files-dir", str(self.files_dir), "--files-claim", FILES_CLAIM,
             "--keys-namespace", self.release_namespace,
             "--model", f"{BASE_MODEL}=pvc://{FILES_CLAIM}/models/{BASE_MODEL}",
             "--job-template", str(template), "--inference-host", "127.0.0.1",
             *(["--files-store", self.files_store, "--files-store-endpoint", self.cluster.s3_url]
               if self.files_store else []), *self.extra_args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=REPO_ROOT, env={**os.environ, "KUBECONFIG": kubeconfig})
        out.close()
        (self.state_dir / "openai-api.pid").write_text(str(self.process.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the OpenAI API exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the OpenAI API did not answer on port {self.port} within {timeout:.0f}s:\n{self.tail()}")

    def create_key(self, namespace: str | None = None) -> str:
        """An API key bound to `namespace` (default: the served one), issued with the admin credential."""
        out = subprocess.run(
            [sys.executable, "-m", "finetune_operator", "api", "create-key", "--namespace", namespace or self.namespace,
             "--keys-namespace", self.release_namespace],
            check=True, capture_output=True, text=True, env=self.cluster.env(), cwd=REPO_ROOT)
        return out.stdout.strip()

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, *, remove_cluster_objects: bool = True) -> None:
        if self.process is not None and self.process.poll() is None:
            _kill_group(self.process.pid)
        self.process = None
        if remove_cluster_objects:
            for kind, name in self.cluster_objects:
                self.kubectl("delete", kind, name, "--ignore-not-found", check=False)


def stop_from_pid_file(state_dir: Path) -> bool:
    pid_file = state_dir / "openai-api.pid"
    if not pid_file.exists():
        return False
    _kill_group(int(pid_file.read_text()))
    pid_file.unlink()
    return True
