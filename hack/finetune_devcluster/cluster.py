"""A real local Kubernetes control plane for tests and the demo.

etcd, kube-apiserver (TLS, RBAC, ServiceAccount tokens), kube-controller-manager,
kube-scheduler and kwok run as local processes on dynamic ports; kwok fakes a pool of
GPU and CPU nodes, and the pods bound to the node named `local` really run: by default on
the local node agent (`localnode.py`, a kubelet stand-in), or with `node="kubelet"`
(`FINETUNE_NODE=kubelet`) on a real node: containerd, runc, a kubelet and kube-proxy
running the project's own images (`realnode.py`). Everything lives under one state directory (`.cluster/` by
default): certificates, kubeconfig, logs, pids, etcd data and volumes.

This is development tooling: the operator never imports it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-control-plane.sh"
MLFLOW_INSTALL_SCRIPT = REPO_ROOT / "hack" / "install-mlflow-server.sh"
MINIO_BUILD_SCRIPT = REPO_ROOT / "hack" / "build-minio.sh"
S3_ACCESS_KEY = "finetune-dev"
S3_REGION = "us-east-1"

GPU_NODES = ("gpu-node-0", "gpu-node-1")
CPU_NODES = ("cpu-node-0",)
LOCAL_NODE = "local"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT_KEY = "nvidia.com/gpu"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
LOCAL_NODE_LABEL = "finetune.dev/local-node"
NODE_KINDS = ("local", "kubelet")
STORAGE_CLASS = "local-hostpath"
STORAGE_PROVISIONER = "finetune.dev/local-hostpath"
# kwok's own stage configs (from its module source): node set-up and heartbeats, and the
# "general" pod lifecycle, whose delays pods can tune with kwok's stage annotations.
KWOK_NODE_LEASE_SECONDS = 40  # a kubelet's default
KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/general/pod-create.yaml",
    "pod/general/pod-init-container-running.yaml",
    "pod/general/pod-init-container-completed.yaml",
    "pod/general/pod-ready.yaml",
    "pod/general/pod-complete.yaml",
    "pod/general/pod-delete.yaml",
)


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike CalledProcessError, its message carries kubectl's stderr."""

    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd[1:]))} exited {self.returncode}: {(self.stderr or '').strip()}"


class ClusterError(RuntimeError):
    """A component failed to start; the message names it and carries its log's tail."""


def control_plane_binaries() -> Path:
    """Build (or find in the cache) the pinned binaries; returns their directory."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise ClusterError(f"building the control plane failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def mlflow_server_venv() -> Path:
    """Install (or find in the cache) the MLflow tracking server's virtualenv; returns it."""
    out = subprocess.run(["bash", str(MLFLOW_INSTALL_SCRIPT)], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise ClusterError(f"installing the MLflow server failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def minio_binary() -> Path:
    """Build (or find in the cache) the MinIO server; returns the binary."""
    out = subprocess.run(["bash", str(MINIO_BUILD_SCRIPT)], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise ClusterError(f"building MinIO failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1]) / "minio"


def minio_server(binary: Path, data: Path, address: str, console_address: str,
                 secret_key: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of a single-drive MinIO server on `address` storing into `data`;
    its root user is S3_ACCESS_KEY / `secret_key` (no web console, no update checks)."""
    data.mkdir(parents=True, exist_ok=True)
    return ([str(binary), "server", str(data), "--quiet", "--address", address,
             "--console-address", console_address],
            {"MINIO_ROOT_USER": S3_ACCESS_KEY, "MINIO_ROOT_PASSWORD": secret_key,
             "MINIO_BROWSER": "off", "MINIO_UPDATE": "off", "MINIO_REGION": S3_REGION})


# The server runs from its own virtualenv: none of the caller's Python path leaks in.
MLFLOW_SERVER_ENV = {"PYTHONPATH": ""}


def mlflow_server_argv(venv: Path, data: Path, port: int) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port`: runs in SQLite under `data`, artifacts proxied by
    the server (clients upload over HTTP) into `data/artifacts`."""
    (data / "artifacts").mkdir(parents=True, exist_ok=True)
    return [str(venv / "bin" / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}",
            "--artifacts-destination", str(data / "artifacts"), "--serve-artifacts", "--workers", "1"]


# Listening ports come from below the kernel's ephemeral range (net.ipv4.ip_local_port_range,
# 32768-60999 by default). A port the kernel hands out for bind(0) comes from that range too, and
# so does the source port of every outgoing connection: a port picked that way could be taken by
# any client socket before the component bound it ("bind: address already in use"; it took down
# a whole test session's control plane once).
LISTEN_PORTS = range(20000, 32000)
_port_rng = random.Random()


def free_port() -> int:
    for _ in range(200):
        port = _port_rng.choice(LISTEN_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ClusterError(f"no free port in {LISTEN_PORTS.start}-{LISTEN_PORTS.stop - 1} after 200 tries")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)


class Cluster:
    """Start with `Cluster(state_dir).start()`; stop with `.stop()` (kills by pid)."""

    def __init__(self, state_dir: Path | str | None = None, *, bin_dir: Path | None = None,
                 local_node: bool = True, mlflow: bool = True, s3: bool = True,
                 node: str | None = None, images: tuple[str, ...] = ()) -> None:
        self.state_dir = Path(state_dir or REPO_ROOT / ".cluster").resolve()
        self.bin_dir = bin_dir
        self.local_node = local_node
        self.mlflow = mlflow
        self.s3 = s3
        self.s3_secret_key = ""
        # Who runs the pods bound to `local`: the stand-in agent or a real kubelet.
        self.node = node or os.environ.get("FINETUNE_NODE", "local")
        if self.node not in NODE_KINDS:
            raise ClusterError(f"FINETUNE_NODE={self.node!r}: expected one of {', '.join(NODE_KINDS)}")
        # Images (`make images` names) imported into the real node's containerd at start.
        self.images = tuple(images)
        self.image_refs: dict[str, str] = {}
        self.real_node = None
        self.node_name = LOCAL_NODE
        self.host_ip = "127.0.0.1"
        self.pod_subnet = ""
        self.components: list[Component] = []
        self.ports: dict[str, int] = {}

    # paths -------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def volumes(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "pids.json"

    @property
    def server(self) -> str:
        return f"https://{self.host_ip}:{self.ports['apiserver']}"

    @property
    def mlflow_env_file(self) -> Path:
        return self.state_dir / "mlflow.env"

    @property
    def mlflow_url(self) -> str:
        """The MLflow tracking server, from this machine. Pods reach it at the same URL:
        the local node runs pods on the host's network (MLFLOW_CLUSTER_TRACKING_URI)."""
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def s3_env_file(self) -> Path:
        return self.state_dir / "s3.env"

    @property
    def s3_url(self) -> str:
        """The S3-compatible store (MinIO), from this machine and from pods: the local node runs
        pods on the host's network; a real node's pods reach the host at its node address,
        where MinIO listens then."""
        return f"http://{self.host_ip}:{self.ports['s3']}"

    def s3_env(self) -> dict[str, str]:
        """The store's endpoint and credentials as the AWS SDKs read them."""
        return {"AWS_ENDPOINT_URL": self.s3_url, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": self.s3_secret_key, "AWS_REGION": S3_REGION,
                "S3_CLUSTER_ENDPOINT_URL": self.s3_url}

    # lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float = 120) -> "Cluster":
        """Start everything; a component that lost its port to another process between the
        choice and its bind is retried with new ports (twice at most)."""
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except ClusterError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                print(f"dev cluster: a port was taken before its component bound it; starting again "
                      f"with new ports ({exc.__str__().splitlines()[0]})", file=sys.stderr)
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> "Cluster":
        if self.pid_file.exists():
            stop_from_pid_file(self.state_dir)
        self.bin_dir = self.bin_dir or control_plane_binaries()
        kubelet = self.local_node and self.node == "kubelet"
        if kubelet:
            from .realnode import RealNode, build_images, host_ip

            self.real_node = RealNode(self)
            self.real_node.preflight()
            self.host_ip = host_ip()
            self.pod_subnet = "10.88.0.0/24"
            # pause (the sandbox) always; the rest as asked.
            images = build_images(*dict.fromkeys(("pause",) + self.images))
            self.image_refs = {name: ref for name, (ref, _) in images.items()}
        if self.state_dir.exists():
            self._cleanup_real_node_leftovers()
            shutil.rmtree(self.state_dir, ignore_errors=True)
        for d in (self.pki, self.logs, self.volumes, self.state_dir / "etcd"):
            d.mkdir(parents=True, exist_ok=True)
        names = ["etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok", "mlflow", "s3", "s3-console"]
        if kubelet:
            names += ["kubelet", "kubelet-healthz", "kube-proxy-metrics", "kube-proxy-healthz"]
        self.ports = {name: free_port() for name in names}
        mlflow_venv = mlflow_server_venv() if self.mlflow else None
        minio = minio_binary() if self.s3 else None
        self._write_pki()
        self._write_kubeconfig()
        deadline = time.monotonic() + timeout
        try:
            if mlflow_venv is not None:
                # First, and not waited for here: its database set-up takes tens of seconds
                # (minutes on a loaded machine). wait_mlflow() is for those who use it.
                self._launch(self._mlflow_server(mlflow_venv))
                self._write_mlflow_env()
            self._launch(self._etcd())
            self._wait_http(f"http://127.0.0.1:{self.ports['etcd']}/health", "etcd", deadline)
            self._launch(self._apiserver())
            self._wait_apiserver(deadline)
            self._launch(self._controller_manager())
            self._launch(self._scheduler())
            self._launch(self._kwok())
            if kubelet:
                # The kwok nodes and the StorageClass first: the real node's start-up (image
                # import, kubelet registration) loads a 2-core machine's API server.
                self._create_nodes_and_storage()
                self._start_real_node(images, deadline + 600)
                deadline = time.monotonic() + timeout  # the import above took its own time
            else:
                if self.local_node:
                    self._launch(self._local_node_agent())
                self._create_nodes_and_storage()
            if minio is not None:
                # After the nodes: a real node's address (where pods reach the host) exists then.
                self._launch(self._minio(minio))
                self._wait_http(f"{self.s3_url}/minio/health/ready", "MinIO", deadline)
                self._write_s3_env()
            self._wait_nodes_ready(deadline)
            self._wait_default_serviceaccount(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_mlflow(self, timeout: float = 600) -> str:
        """Wait until the MLflow tracking server answers; returns its URL."""
        if not self.mlflow:
            raise ClusterError("this cluster was started without an MLflow server (mlflow=False)")
        self._wait_http(f"{self.mlflow_url}/health", "the MLflow tracking server", time.monotonic() + timeout)
        return self.mlflow_url

    def stop(self) -> None:
        if self.real_node is not None and self.real_node.bin_dir is not None:
            # The kubelet first (it would re-create the sandboxes being killed), then the pods
            # before containerd goes: its shims outlive it.
            for c in self.components:
                if c.name == "kubelet" and c.process and c.process.poll() is None:
                    _kill_group(c.process.pid)
            self.real_node.stop_pods()
        stop_from_pid_file(self.state_dir)
        for c in reversed(self.components):
            if c.process and c.process.poll() is None:
                _kill_group(c.process.pid)
        self.components.clear()
        if self.real_node is not None:
            self.real_node.cleanup()

    def _start_real_node(self, images: dict, deadline: float) -> None:
        rn = self.real_node
        rn.write_files(self.ports)
        containerd, kubelet, proxy = rn.components(Component)
        self._launch(containerd)
        rn.wait_containerd(deadline, self._check_alive)
        # Imported before the kubelet starts: its image GC and the CRI never pull.
        rn.import_images([archive for _, archive in images.values()])
        self._launch(kubelet)
        self._launch(proxy)
        # The StorageClass's provisioner still comes from the agent, without its node.
        self._launch(self._local_node_agent(provisioner_only=True))

    def _cleanup_real_node_leftovers(self) -> None:
        """A previous run's node under this state dir: its containers and mounts go first."""
        _stop_real_node(self.state_dir, before=True)
        _stop_real_node(self.state_dir, before=False)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def restart_component(self, name: str, timeout: float = 60) -> None:
        """Stop one component (SIGKILL) and start it again with the same flags."""
        comp = next(c for c in self.components if c.name == name)
        if comp.process and comp.process.poll() is None:
            _kill_group(comp.process.pid, sig=signal.SIGKILL)
            comp.process.wait(timeout=30)
        self._launch(comp, register=False)
        deadline = time.monotonic() + timeout
        if name == "etcd":
            self._wait_http(f"http://127.0.0.1:{self.ports['etcd']}/health", "etcd", deadline)
        if name == "kube-apiserver":
            self._wait_apiserver(deadline)

    def logs_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {c.name} ({c.log}) ---\n{_tail(c.log, lines)}" for c in self.components)

    # helpers for tests and tooling -------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                token: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}"]
        if token is not None:
            # Act as a ServiceAccount: same server and CA, bearer token instead of the admin cert.
            argv = [str(self.bin_dir / "kubectl"), f"--server={self.server}",
                    f"--certificate-authority={self.pki / 'ca.crt'}", f"--token={token}"]
        out = subprocess.run(argv + list(args), input=input, capture_output=True, text=True,
                             timeout=timeout, check=False)
        if check and out.returncode != 0:
            raise KubectlError(out.returncode, argv + list(args), out.stdout, out.stderr)
        return out

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Wait until each named CRD (e.g. `finetunejobs.finetune.dev`; none: every CRD) is
        Established. `kubectl wait --for=condition=Established` right after an apply fails at
        once while a new CRD has no conditions yet ("status.conditions accessor error"), which
        broke a whole session's cluster tests now and then."""
        import json
        import time

        def established(obj: dict) -> bool:
            return any(c.get("type") == "Established" and c.get("status") == "True"
                       for c in (obj.get("status") or {}).get("conditions") or [])

        deadline = time.monotonic() + timeout
        while True:
            out = self.kubectl("get", "crd", *crds, "-o", "json", check=False)
            if out.returncode == 0:
                doc = json.loads(out.stdout)
                items = doc.get("items", [doc]) if doc.get("kind") == "List" or "items" in doc else [doc]
                if items and all(established(i) for i in items):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRDs {crds or 'all'} not Established after {timeout:.0f}s: "
                                   f"{out.stderr.strip()[:300]}")
            time.sleep(0.2)

    def env(self) -> dict[str, str]:
        """Environment for child processes that should talk to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    # pieces ------------------------------------------------------------------------
    def _launch(self, comp: Component, register: bool = True) -> None:
        log = open(comp.log, "ab")
        comp.process = subprocess.Popen(comp.argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        env={**os.environ, **comp.env})
        log.close()
        if register:
            self.components.append(comp)
        self._write_pids()

    def _write_pids(self) -> None:
        pids = {c.name: c.process.pid for c in self.components if c.process}
        self.pid_file.write_text(json.dumps(pids))

    def _check_alive(self) -> None:
        for c in self.components:
            if c.process and c.process.poll() is not None:
                raise ClusterError(
                    f"{c.name} exited with code {c.process.returncode} while the cluster was "
                    f"starting; last lines of {c.log}:\n{_tail(c.log)}")

    def _wait(self, what: str, probe, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                if probe():
                    return
            except Exception:  # noqa: BLE001 - a probe that errors is simply not ready yet
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}\n{self.logs_tail()}")
            time.sleep(0.2)

    def _wait_http(self, url: str, what: str, deadline: float) -> None:
        import urllib.request

        self._wait(what, lambda: urllib.request.urlopen(url, timeout=2).status == 200, deadline)

    def _wait_apiserver(self, deadline: float) -> None:
        def ready() -> bool:
            out = self.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
            return out.returncode == 0 and out.stdout.strip() == "ok"

        self._wait("kube-apiserver /readyz", ready, deadline)

    def _wait_nodes_ready(self, deadline: float) -> None:
        names = list(GPU_NODES + CPU_NODES) + ([LOCAL_NODE] if self.local_node else [])

        def ready() -> bool:
            out = self.kubectl("get", "nodes", "-o", "json", check=False, timeout=10)
            items = json.loads(out.stdout)["items"] if out.returncode == 0 else []
            status = {n["metadata"]["name"]: any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n.get("status", {}).get("conditions", [])) for n in items}
            return all(status.get(n) for n in names)

        self._wait("nodes to become Ready", ready, deadline)

    def _wait_default_serviceaccount(self, deadline: float) -> None:
        self._wait("the default ServiceAccount",
                   lambda: self.kubectl("get", "sa", "default", "-n", "default", check=False,
                                        timeout=10).returncode == 0, deadline)

    def _mlflow_server(self, venv: Path) -> Component:
        return Component("mlflow", mlflow_server_argv(venv, self.state_dir / "mlflow", self.ports["mlflow"]),
                         self.logs / "mlflow.log", env=MLFLOW_SERVER_ENV)

    def _write_mlflow_env(self) -> None:
        self.mlflow_env_file.write_text(
            "# The dev cluster's MLflow tracking server. `set -a; . this-file; set +a` exports them.\n"
            "# MLFLOW_CLUSTER_TRACKING_URI is what a FineTuneJob's spec.tracking.mlflow.trackingUri\n"
            "# should say; it equals MLFLOW_TRACKING_URI because the local node runs pods on this\n"
            "# machine's network (loopback).\n"
            f"MLFLOW_TRACKING_URI={self.mlflow_url}\n"
            f"MLFLOW_CLUSTER_TRACKING_URI={self.mlflow_url}\n")

    def _minio(self, binary: Path) -> Component:
        import secrets

        self.s3_secret_key = secrets.token_hex(20)
        argv, env = minio_server(binary, self.state_dir / "s3", f"{self.host_ip}:{self.ports['s3']}",
                                 f"127.0.0.1:{self.ports['s3-console']}", self.s3_secret_key)
        return Component("s3", argv, self.logs / "minio.log", env=env)

    def _write_s3_env(self) -> None:
        text = ("# The dev cluster's S3-compatible store (MinIO). `set -a; . this-file; set +a` exports\n"
                "# them. AWS_* are for this machine; S3_CLUSTER_ENDPOINT_URL is the endpoint pods use (the\n"
                "# AWS_ENDPOINT_URL of a spec.objectStorage Secret).\n"
                + "".join(f"{k}={v}\n" for k, v in self.s3_env().items()))
        self.s3_env_file.touch(mode=0o600)
        self.s3_env_file.write_text(text)

    def _etcd(self) -> Component:
        p = self.ports
        return Component("etcd", [
            str(self.bin_dir / "etcd"), f"--data-dir={self.state_dir / 'etcd'}", "--name=default",
            f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
            f"--initial-cluster=default=http://127.0.0.1:{p['etcd-peer']}",
            "--unsafe-no-fsync", "--log-level=warn",
        ], self.logs / "etcd.log")

    def _apiserver(self) -> Component:
        p, k = self.ports, self.pki
        return Component("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
            # With a real node, pods reach the API server (the `kubernetes` Service's endpoint)
            # at the host's address, and the API server reaches the kubelet.
            *(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"] if self.real_node is None else
              [f"--bind-address={self.host_ip}", f"--advertise-address={self.host_ip}",
               f"--kubelet-client-certificate={k / 'apiserver-kubelet-client.crt'}",
               f"--kubelet-client-key={k / 'apiserver-kubelet-client.key'}",
               "--kubelet-preferred-address-types=InternalIP",
               "--enable-admission-plugins=NodeRestriction"]),
            f"--secure-port={p['apiserver']}",
            f"--tls-cert-file={k / 'apiserver.crt'}", f"--tls-private-key-file={k / 'apiserver.key'}",
            f"--client-ca-file={k / 'ca.crt'}",
            # Front-proxy settings: without them every component logs a missing CA bundle.
            f"--requestheader-client-ca-file={k / 'ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            # The Node authorizer gives the real kubelet (system:nodes) its permissions.
            f"--authorization-mode={'RBAC' if self.real_node is None else 'Node,RBAC'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={k / 'sa.pub'}",
            f"--service-account-signing-key-file={k / 'sa.key'}",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--allow-privileged=true",
            f"--cert-dir={k}",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ], self.logs / "kube-apiserver.log")

    def _controller_manager(self) -> Component:
        k = self.pki
        return Component("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['kcm']}",
            f"--cert-dir={self.state_dir / 'kcm-certs'}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={k / 'sa.key'}",
            f"--root-ca-file={k / 'ca.crt'}",
            f"--cluster-signing-cert-file={k / 'ca.crt'}",
            f"--cluster-signing-key-file={k / 'ca.key'}",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route",
            "--concurrent-job-syncs=10",
            "--kube-api-qps=200", "--kube-api-burst=400",
            "--v=1",
        ], self.logs / "kube-controller-manager.log")

    def _scheduler(self) -> Component:
        return Component("kube-scheduler", [
            str(self.bin_dir / "kube-scheduler"),
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={self.ports['scheduler']}",
            f"--cert-dir={self.state_dir / 'scheduler-certs'}",
            "--leader-elect=false",
            "--kube-api-qps=200", "--kube-api-burst=400",
            "--v=1",
        ], self.logs / "kube-scheduler.log")

    def _kwok(self) -> Component:
        stages = self.bin_dir / "kwok-stages"
        configs = []
        for stage in KWOK_STAGES:
            if not (stages / stage).is_file():
                raise ClusterError(f"kwok stage {stage} not found under {stages}")
            configs.append(f"--config={stages / stage}")
        return Component("kwok", [
            str(self.bin_dir / "kwok"), f"--kubeconfig={self.kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{self.ports['kwok']}",
            "--node-ip=127.0.0.1", "--cidr=10.0.0.1/24",
            # Node Leases, renewed every 10 s as a kubelet does. Without them a kwok node's only
            # heartbeat is its status, patched about every 55 s: longer than the controller
            # manager's node-monitor-grace-period (50 s), so every minute each kwok node was
            # NotReady for up to 5 s and the node lifecycle controller marked its pods NotReady
            # (the "kwok readiness flaps on a loaded machine" of issue 13).
            f"--node-lease-duration-seconds={KWOK_NODE_LEASE_SECONDS}",
            *configs,
        ], self.logs / "kwok.log")

    def _local_node_agent(self, provisioner_only: bool = False) -> Component:
        return Component("local-node" if not provisioner_only else "provisioner", [
            sys.executable, "-m", "finetune_devcluster.localnode",
            f"--kubeconfig={self.kubeconfig}", f"--node-name={LOCAL_NODE}",
            f"--state-dir={self.state_dir / 'local-node'}",
            f"--volumes-dir={self.volumes}",
            f"--storage-provisioner={STORAGE_PROVISIONER}",
            *(["--provisioner-only"] if provisioner_only else []),
        ], self.logs / ("provisioner.log" if provisioner_only else "local-node.log"),
            env={"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "hack"),
                                                               os.environ.get("PYTHONPATH")]))})

    def _create_nodes_and_storage(self) -> None:
        from . import manifests

        docs = manifests.nodes(GPU_NODES, CPU_NODES) + manifests.storage()
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                           "items": docs}))
        for node in GPU_NODES + CPU_NODES:
            # Capacity is status: set through the status subresource, as a kubelet would.
            self.kubectl("patch", "node", node, "--subresource=status", "--type=merge",
                         "-p", json.dumps(manifests.node_status(node, node in GPU_NODES)))

    def add_kwok_node(self, name: str, *, gpus: int) -> None:
        """One more kwok GPU node, as an autoscaler would add to a pool (tests delete it)."""
        from . import manifests

        [node] = manifests.nodes((name,), ())
        self.kubectl("apply", "-f", "-", input=json.dumps(node))
        self.kubectl("patch", "node", name, "--subresource=status", "--type=merge",
                     "-p", json.dumps(manifests.node_status(name, True, gpus)))

    # certificates ------------------------------------------------------------------
    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.pki)

    def _write_pki(self) -> None:
        o = self._openssl
        o("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
          "-days", "365", "-subj", "/CN=finetune-devcluster-ca")
        (self.pki / "apiserver.ext").write_text(
            f"subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:{self.host_ip},DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
            "extendedKeyUsage=serverAuth\n")
        self._signed("apiserver", "/CN=kube-apiserver", "apiserver.ext")
        (self.pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
        self._signed("admin", "/O=system:masters/CN=admin", "client.ext")
        if self.real_node is not None:
            # What the API server presents to the kubelet (logs, exec, port-forward).
            self._signed("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
                         "client.ext")
        o("genrsa", "-out", "sa.key", "2048")
        o("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")

    def _signed(self, name: str, subject: str, ext: str) -> None:
        o = self._openssl
        o("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
          "-subj", subject)
        o("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
          "-CAcreateserial", "-out", f"{name}.crt", "-days", "365", "-extfile", ext)

    def _write_kubeconfig(self) -> None:
        import yaml

        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "finetune-dev",
            "clusters": [{"name": "finetune-dev", "cluster": {
                "server": self.server, "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": "admin", "user": {
                "client-certificate": str(self.pki / "admin.crt"),
                "client-key": str(self.pki / "admin.key")}}],
            "contexts": [{"name": "finetune-dev", "context": {"cluster": "finetune-dev", "user": "admin"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg))
        self.kubeconfig.chmod(0o600)


def _kill_group(pid: int, sig: int = signal.SIGTERM, grace: float = 10) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            # Reap if it is our child; ignore if it is not.
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_from_pid_file(state_dir: Path) -> list[str]:
    """Stop every process a previous `start` recorded, by pid; returns their names."""
    pid_file = Path(state_dir) / "pids.json"
    if not pid_file.exists():
        return []
    pids = json.loads(pid_file.read_text() or "{}")
    _stop_real_node(state_dir, before=True)
    for name, pid in reversed(list(pids.items())):
        _kill_group(pid)
    _stop_real_node(state_dir, before=False)
    pid_file.unlink(missing_ok=True)
    return list(pids)


def _stop_real_node(state_dir: Path, *, before: bool) -> None:
    """A real node's containers and shims outlive containerd: kill them before it stops
    (`before`), then unmount what pods left and remove the bridge and iptables chains."""
    if not (Path(state_dir) / "node" / "containerd").exists():
        return
    from .realnode import RealNode, node_binaries

    rn = RealNode(Cluster(state_dir, node="kubelet"))
    rn.bin_dir = node_binaries()
    if before:
        rn.stop_pods()
    else:
        rn.cleanup()
