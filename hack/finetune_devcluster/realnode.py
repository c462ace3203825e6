"""The real node: containerd, runc, a kubelet and kube-proxy run the pods bound to `local`.

Chosen with `Cluster(node="kubelet")` or `FINETUNE_NODE=kubelet`. Everything lives under
the cluster's state directory (`node/`): containerd's root, state and socket, the
kubelet's root directory and static configuration, CNI configuration and the node's
certificates. Pods get their own IPs from a CNI bridge in network namespaces, and
kube-proxy (iptables mode) makes Services work; the host reaches pods at their IPs.

The images pods run are the project's own (`make images`), imported from buildah's
archives into containerd's `k8s.io` namespace: no registry is involved.

One real node per machine at a time: kube-proxy owns the host's KUBE-* iptables chains
and the kubelet the `/kubepods` cgroups, so a second one refuses to start (a file
names the holder, `/run/finetune-devcluster-realnode.lock`).

The kubelet runs with `failCgroupV1: false` and the cgroupfs driver: this VM mounts
cgroup v1 hierarchies and has no systemd.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_BUILD_SCRIPT = REPO_ROOT / "hack" / "build-node.sh"
RUNC_BUILD_SCRIPT = REPO_ROOT / "hack" / "build-runc.sh"
IMAGES_BUILD_SCRIPT = REPO_ROOT / "hack" / "build-images.sh"
LOCK_FILE = Path("/run/finetune-devcluster-realnode.lock")
POD_CIDR = "10.88.0.0/16"
SANDBOX_IMAGE = "localhost/finetune/pause:local"
# Where containerd's runc shim keeps runc's state for the k8s.io namespace (its default).
RUNC_ROOT = "/run/containerd/runc/k8s.io"


class RealNodeError(RuntimeError):
    pass


def node_binaries() -> Path:
    out = subprocess.run(["bash", str(NODE_BUILD_SCRIPT)], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RealNodeError(f"building the node's binaries failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def runc_binary() -> Path:
    """runc >= 1.2 from its Go module (hack/build-runc.sh): containerd 2.x's CRI pod sandboxes
    fail under Debian bookworm's runc 1.1.5 ("can't get final child's PID from pipe")."""
    out = subprocess.run(["bash", str(RUNC_BUILD_SCRIPT)], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise RealNodeError(f"building runc failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1]) / "runc"


def build_images(*names: str) -> dict[str, tuple[str, Path]]:
    """`make images` for the given names; returns {name: (reference, archive)}."""
    out = subprocess.run(["bash", str(IMAGES_BUILD_SCRIPT), *names], check=False, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RealNodeError(f"building the images {names} failed:\n{out.stderr[-4000:]}")
    images = {}
    for line in out.stdout.splitlines():
        name, ref, archive = line.split()
        images[name] = (ref, Path(archive))
    return images


def not_cached(*images: str) -> str | None:
    """Why the real node cannot start without building anything, or None: the node's
    binaries, runc and the archives of pause and `images` for the current sources all cached,
    root, and no other real node running on this machine."""
    if os.geteuid() != 0:
        return "the real node runs as root"
    for what, cmd in (("the node's binaries (make node)", [NODE_BUILD_SCRIPT, "--cached"]),
                      ("runc (make node)", [RUNC_BUILD_SCRIPT, "--cached"]),
                      (f"the images {', '.join(('pause',) + images)} for these sources (make images)",
                       [IMAGES_BUILD_SCRIPT, "--cached", "pause", *images])):
        if subprocess.run(["bash", *map(str, cmd)], capture_output=True).returncode != 0:
            return f"{what} not cached"
    holder = _live_holder()
    if holder:
        return f"a real node already runs on this machine ({holder})"
    return None


def host_ip() -> str:
    """The address pods reach the host (and the API server) at: the default route's source."""
    out = subprocess.run(["ip", "-4", "-o", "route", "get", "1.1.1.1"], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[out.index("src") + 1]


def _live_holder() -> str | None:
    """The state dir of the real node running on this machine, if its containerd is alive."""
    try:
        state_dir = LOCK_FILE.read_text().strip()
        pid = json.loads((Path(state_dir) / "pids.json").read_text())["containerd"]
        os.kill(pid, 0)
        return state_dir
    except (OSError, KeyError, ValueError):
        return None


def _cgroup_v1_missing() -> list[str]:
    root = Path("/sys/fs/cgroup")
    return [c for c in ("cpu", "cpuacct", "cpuset", "memory", "pids") if not (root / c).is_dir()]


class RealNode:
    """The node's processes as `Component`s for `Cluster`, and its files."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.dir = cluster.state_dir / "node"
        self.bin_dir: Path | None = None
        self.runc: Path | None = None
        # A short per-cluster tag: bridge names are at most 15 characters.
        self.tag = hashlib.sha256(str(cluster.state_dir).encode()).hexdigest()[:6]

    @property
    def socket_dir(self) -> Path:
        """containerd's sockets: a short path of their own (a unix socket's path is limited to
        ~104 bytes, and state dirs such as pytest's tmp_path are longer)."""
        return Path("/run/finetune-devcluster") / self.tag

    @property
    def kubelet_dir(self) -> Path:
        """The kubelet's root directory, short for the same reason: it binds unix sockets in it
        (pod-resources, plugins). On disk, not in /run: pods' emptyDirs live there."""
        return Path("/var/lib/finetune-devcluster") / self.tag / "kubelet"

    @property
    def containerd_socket(self) -> Path:
        return self.socket_dir / "containerd.sock"

    @property
    def bridge(self) -> str:
        return f"ftn{self.tag}"

    def preflight(self) -> None:
        missing = [t for t in ("iptables", "ip", "openssl") if not shutil.which(t)]
        if missing:
            raise RealNodeError(f"the real node needs {', '.join(missing)} on PATH "
                                "(hack/build-node.sh installs iptables and conntrack from Debian's packages)")
        if os.geteuid() != 0:
            raise RealNodeError("the real node (containerd, kubelet, kube-proxy) must run as root")
        if _cgroup_v1_missing() and not Path("/sys/fs/cgroup/cgroup.controllers").exists():
            raise RealNodeError(f"no cgroup hierarchy for {_cgroup_v1_missing()} under /sys/fs/cgroup")
        holder = _live_holder()
        if holder and holder != str(self.cluster.state_dir):
            raise RealNodeError(f"another real node is running on this machine (state dir {holder}); "
                                "one at a time: stop it first (make cluster-down / make demo-down)")
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        LOCK_FILE.write_text(f"{self.cluster.state_dir}\n")

    def release(self) -> None:
        if _live_holder() is None and LOCK_FILE.exists() \
                and LOCK_FILE.read_text().strip() == str(self.cluster.state_dir):
            LOCK_FILE.unlink(missing_ok=True)

    # certificates and configuration ---------------------------------------------------
    def write_files(self, apiserver_ports: dict[str, int]) -> None:
        self.bin_dir = node_binaries()
        self.runc = runc_binary()
        c = self.cluster
        for d in ("containerd/root", "containerd/state", "cni/net.d", "pki", "logs"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        self.kubelet_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ip = c.host_ip
        # The kubelet's identity: system:node:local in system:nodes (Node authorizer).
        c._signed("kubelet", f"/O=system:nodes/CN=system:node:{c.node_name}", "client.ext")
        c._signed("kube-proxy", "/CN=system:kube-proxy", "client.ext")
        for who in ("kubelet", "kube-proxy"):
            self._kubeconfig(who)
        self._containerd_config()
        self._cni_config()
        self._kubelet_config(apiserver_ports)
        self._kube_proxy_config(apiserver_ports)
        _ = ip

    def _kubeconfig(self, who: str) -> None:
        c = self.cluster
        (self.dir / f"{who}.kubeconfig").write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": who,
            "clusters": [{"name": "local", "cluster": {"server": c.server,
                                                       "certificate-authority": str(c.pki / "ca.crt")}}],
            "users": [{"name": who, "user": {"client-certificate": str(c.pki / f"{who}.crt"),
                                             "client-key": str(c.pki / f"{who}.key")}}],
            "contexts": [{"name": who, "context": {"cluster": "local", "user": who}}]}))

    def _containerd_config(self) -> None:
        d = self.dir / "containerd"
        runc = self.runc
        cfg = f"""version = 3
root = "{d / 'root'}"
state = "{d / 'state'}"

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{self.containerd_socket}.ttrpc"

[debug]
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{SANDBOX_IMAGE}"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # root here lacks CAP_SYS_RESOURCE: a negative oom_score_adj (the kubelet asks -998 for
  # every pod sandbox) fails runc's nsexec ("can't get final child's PID from pipe: EOF").
  # Clamp containers' oom_score_adj at containerd's own (0), as for rootless containerd.
  restrict_oom_score_adj = true
  # Pods' network namespaces under containerd's state (not /var/run/netns), so that stopping
  # the node unmounts them with the rest of its state.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{self.bin_dir / 'cni'}"]
    conf_dir = "{self.dir / 'cni' / 'net.d'}"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
"""
        (d / "config.toml").write_text(cfg)

    def _cni_config(self) -> None:
        subnet = self.cluster.pod_subnet
        conf = {
            "cniVersion": "1.0.0", "name": "finetune-dev",
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": True,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(self.dir / "cni" / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (self.dir / "cni" / "net.d" / "10-finetune.conflist").write_text(json.dumps(conf, indent=1))
        (self.dir / "cni" / "net.d" / "99-loopback.conf").write_text(json.dumps(
            {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}))

    def _kubelet_config(self, ports: dict[str, int]) -> None:
        c = self.cluster
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # this VM mounts cgroup v1; kubelet >= 1.35 refuses it otherwise
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": "/",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": c.host_ip, "port": ports["kubelet"], "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": ports["kubelet-healthz"],
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(c.pki / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "failSwapOn": False,
            "resolvConf": "/etc/resolv.conf",
            "podCIDR": c.pod_subnet,
            "registerNode": True,
            "registerWithTaints": [{"key": "finetune.dev/local-node", "value": "true", "effect": "NoSchedule"}],
            "serializeImagePulls": False,
            # The disk is shared with other work: evict only when it is nearly full, and never
            # garbage-collect the project's images (they cannot be pulled again).
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                             "nodefs.inodesFree": "2%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "nodeStatusUpdateFrequency": "10s", "nodeStatusReportFrequency": "1m",
            "syncFrequency": "30s", "fileCheckFrequency": "20s",
            "shutdownGracePeriod": "0s",
            "enableServer": True,
            "localStorageCapacityIsolation": True,
            "kubeAPIQPS": 50, "kubeAPIBurst": 100,
            "protectKernelDefaults": False,
            "makeIPTablesUtilChains": True,
        }
        (self.dir / "kubelet-config.yaml").write_text(yaml.safe_dump(cfg))

    def _kube_proxy_config(self, ports: dict[str, int]) -> None:
        c = self.cluster
        cfg = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
            "hostnameOverride": c.node_name,
            "clusterCIDR": c.pod_subnet,
            "bindAddress": c.host_ip,
            "metricsBindAddress": f"127.0.0.1:{ports['kube-proxy-metrics']}",
            "healthzBindAddress": f"127.0.0.1:{ports['kube-proxy-healthz']}",
            # Leave the machine's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"masqueradeAll": True, "syncPeriod": "5s", "minSyncPeriod": "0s"},
            "nodePortAddresses": [f"{c.host_ip}/32"],
        }
        (self.dir / "kube-proxy-config.yaml").write_text(yaml.safe_dump(cfg))

    # processes ---------------------------------------------------------------------------
    def components(self, component_cls) -> list:
        # runc's directory first: `ctr run` and the shim find it on PATH where no BinaryName is set.
        env = {"PATH": os.pathsep.join([str(self.runc.parent), str(self.bin_dir), "/usr/local/sbin", "/usr/sbin", "/sbin",
                                        os.environ.get("PATH", "")])}
        logs = self.cluster.logs
        containerd = component_cls("containerd", [
            str(self.bin_dir / "containerd"), f"--config={self.dir / 'containerd' / 'config.toml'}",
        ], logs / "containerd.log", env=env)
        kubelet = component_cls("kubelet", [
            str(self.bin_dir / "kubelet"),
            f"--config={self.dir / 'kubelet-config.yaml'}",
            f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}",
            f"--root-dir={self.kubelet_dir}",
            f"--hostname-override={self.cluster.node_name}",
            f"--node-ip={self.cluster.host_ip}",
            f"--node-labels=finetune.dev/local-node=true,finetune.dev/node=kubelet",
            f"--cert-dir={self.dir / 'pki'}",
            "--v=1",
        ], logs / "kubelet.log", env=env)
        proxy = component_cls("kube-proxy", [
            str(self.bin_dir / "kube-proxy"), f"--config={self.dir / 'kube-proxy-config.yaml'}", "--v=1",
        ], logs / "kube-proxy.log", env=env)
        return [containerd, kubelet, proxy]

    def ctr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / "ctr"), f"--address={self.containerd_socket}",
                               "-n", "k8s.io", *args], capture_output=True, text=True, check=False,
                              timeout=timeout)

    def wait_containerd(self, deadline: float, check_alive) -> None:
        while True:
            check_alive()
            if self.containerd_socket.exists() and self.ctr("version", timeout=10).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RealNodeError(f"containerd did not answer on {self.containerd_socket}")
            time.sleep(0.2)

    def import_images(self, archives: list[Path]) -> None:
        for archive in archives:
            # Once unpacked into snapshots, a layer's compressed blob is garbage: without it a
            # demo's containerd root is ~6 GB smaller (the trainer's and vLLM's CUDA wheels).
            out = self.ctr("images", "import", "--local", "--discard-unpacked-layers", str(archive))
            if out.returncode != 0:
                raise RealNodeError(f"ctr images import {archive} failed: {out.stderr.strip()}")

    def stop_pods(self) -> None:
        """Kill every container and sandbox and the shims: they outlive containerd otherwise."""
        if self.containerd_socket.exists():
            tasks = self.ctr("tasks", "ls", "-q", timeout=30)
            for task in tasks.stdout.split() if tasks.returncode == 0 else []:
                self.ctr("tasks", "kill", "--all", "-s", "SIGKILL", task, timeout=30)
            deadline = time.monotonic() + 30
            for task in tasks.stdout.split() if tasks.returncode == 0 else []:
                while self.ctr("tasks", "delete", task, timeout=30).returncode != 0 \
                        and "not found" not in self.ctr("tasks", "ps", task, timeout=10).stderr \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
        self._kill_containers()
        self._kill_shims()

    def _kill_shims(self) -> None:
        """Shims serving this node's socket (they left containerd's process group)."""
        sock = str(self.containerd_socket)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and sock.encode() in b" ".join(argv):
                try:
                    os.kill(int(proc.name), 9)
                except ProcessLookupError:
                    pass

    def _kill_containers(self) -> None:
        """Every container whose bundle is under this node's state, straight through runc: what
        containerd no longer lists (a sandbox the kubelet re-created while stopping, or one
        left when containerd died) still runs otherwise."""
        runc = self.runc or runc_binary()
        root = RUNC_ROOT
        out = subprocess.run([str(runc), "--root", root, "list", "-f", "json"], capture_output=True,
                             text=True, check=False, timeout=60)
        try:
            containers = json.loads(out.stdout or "null") or []
        except ValueError:
            containers = []
        state = str(self.dir / "containerd") + os.sep
        for c in containers:
            if not str(c.get("bundle", "")).startswith(state):
                continue
            subprocess.run([str(runc), "--root", root, "kill", "--all", c["id"], "KILL"],
                           capture_output=True, check=False, timeout=30)
            subprocess.run([str(runc), "--root", root, "delete", "--force", c["id"]],
                           capture_output=True, check=False, timeout=30)

    def cleanup(self) -> None:
        """After the processes stopped: unmount what pods left, remove the bridge and iptables chains."""
        self._kill_containers()
        self._kill_shims()
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        def mounts() -> list[str]:
            try:
                return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
            except OSError:
                return []
        roots = (str(self.dir) + os.sep, str(self.kubelet_dir.parent) + os.sep)
        for m in sorted((m for m in mounts() if m.startswith(roots)), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, check=False)
        # The kubelet's directory (pods' emptyDirs) and containerd's root (the imported images'
        # unpacked layers, gigabytes, imported again at every start) go once nothing is
        # mounted under them.
        left = mounts()
        for d in (self.kubelet_dir.parent, self.dir / "containerd" / "root"):
            if d.exists() and not any(m.startswith(str(d) + os.sep) for m in left):
                shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)
        if self.bin_dir and (self.bin_dir / "kube-proxy").exists():
            subprocess.run([str(self.bin_dir / "kube-proxy"), "--cleanup"], capture_output=True, check=False,
                           timeout=60)
        # The kubelet's own chains (KUBE-FIREWALL drops non-local traffic to 127.0.0.0/8).
        for tool in ("iptables", "ip6tables"):
            run = lambda *args: subprocess.run([tool, *args], capture_output=True, check=False)  # noqa: E731
            for chain in ("INPUT", "OUTPUT"):
                run("-D", chain, "-j", "KUBE-FIREWALL")
            run("-F", "KUBE-FIREWALL")
            run("-X", "KUBE-FIREWALL")
            for table in ("filter", "nat", "mangle"):
                run("-t", table, "-X", "KUBE-KUBELET-CANARY")
            run("-t", "mangle", "-X", "KUBE-IPTABLES-HINT")
        self.release()
