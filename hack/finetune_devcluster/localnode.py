"""The local node: a small kubelet stand-in that really runs pods on this machine.

Pods bound to the node named `local` (by the real scheduler) run here: each container's
command and args execute with the pod's env (values, fieldRefs, Secret/ConfigMap refs), and
its volumes (ConfigMap, Secret, projected ServiceAccount token, PVC, emptyDir) bind-mounted
at their mountPaths in a private mount namespace. Exit codes, termination messages and
readiness (httpGet probes) are written back to the pod's status as a kubelet would; a pod
being deleted gets SIGTERM, then SIGKILL after its grace period.

Images are not pulled: the command runs with this machine's Python environment first on
PATH, so pods must name their command explicitly (the project's pods all do).

It also serves the default StorageClass: a hostPath provisioner that creates a
PersistentVolume for each pending claim (kube-controller-manager's binder binds them) and
removes released volumes whose reclaim policy is Delete.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger("local-node")
LOCAL_NODE_LABEL = "finetune.dev/local-node"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
REPO_ROOT = Path(__file__).resolve().parents[2]
# The source folders of the project's packages (pyproject.toml's packages.find `where`).
SOURCE_DIRS = ("api", "operator", "trainer_image", "openai_api", "hack")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, mult in units.items():
        if q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * mult)
    return int(float(q))


class LocalNode:
    def __init__(self, api: client.ApiClient, node_name: str, state_dir: Path, volumes_dir: Path,
                 provisioner: str) -> None:
        self.core = client.CoreV1Api(api)
        self.coord = client.CoordinationV1Api(api)
        self.storage = client.StorageV1Api(api)
        self.node_name = node_name
        self.state_dir = state_dir
        self.volumes_dir = volumes_dir
        self.provisioner = provisioner
        self.pods: dict[str, PodRunner] = {}
        self.lock = threading.Lock()
        host = api.configuration.host  # https://127.0.0.1:PORT
        self.api_host, self.api_port = host.rsplit("//", 1)[1].split(":")

    # node ----------------------------------------------------------------------------
    def register(self) -> None:
        cpu = str(os.cpu_count() or 2)
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**20}Mi"
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": self.node_name,
            "labels": {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", LOCAL_NODE_LABEL: "true"}},
            "spec": {"taints": [{"key": LOCAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}]}}
        try:
            self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        self.capacity = {"cpu": cpu, "memory": mem, "pods": "110", "ephemeral-storage": "100Gi"}
        self.heartbeat()

    def heartbeat(self) -> None:
        t = now()
        conditions = [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                       "message": "local node agent is running", "lastHeartbeatTime": t,
                       "lastTransitionTime": t}]
        for kind in ("MemoryPressure", "DiskPressure", "PIDPressure"):
            conditions.append({"type": kind, "status": "False", "reason": "KubeletHasSufficient",
                               "lastHeartbeatTime": t, "lastTransitionTime": t})
        self.core.patch_node_status(self.node_name, {"status": {
            "capacity": self.capacity, "allocatable": self.capacity, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {"kubeletVersion": "local", "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "local://", "kernelVersion": os.uname().release,
                         "osImage": "local", "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                         "bootID": ""},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}}}})
        lease = {"metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": 40,
                          "renewTime": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
        try:
            self.coord.replace_namespaced_lease(self.node_name, "kube-node-lease", {
                **lease, "metadata": {**lease["metadata"], "resourceVersion": self.coord.read_namespaced_lease(
                    self.node_name, "kube-node-lease").metadata.resource_version}})
        except ApiException as e:
            if e.status == 404:
                self.coord.create_namespaced_lease("kube-node-lease", lease)
            else:
                raise

    def heartbeat_loop(self) -> None:
        while True:
            try:
                self.heartbeat()
            except Exception as e:  # noqa: BLE001 - the API server may be restarting
                log.warning("heartbeat failed: %s", e)
            time.sleep(10)

    # pods ----------------------------------------------------------------------------
    def pod_loop(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while True:
            try:
                pods = self.core.list_pod_for_all_namespaces(field_selector=selector)
                self._sync({p.metadata.uid: p for p in pods.items})
                for ev in watch.Watch().stream(self.core.list_pod_for_all_namespaces,
                                               field_selector=selector,
                                               resource_version=pods.metadata.resource_version,
                                               timeout_seconds=60):
                    pod = ev["object"]
                    if ev["type"] == "DELETED":
                        self._forget(pod.metadata.uid, kill=True)
                    else:
                        self._handle(pod)
            except Exception as e:  # noqa: BLE001 - reconnect on any watch failure
                log.warning("pod watch restarting: %s", e)
                time.sleep(1)

    def _sync(self, pods: dict) -> None:
        for uid in list(self.pods):
            if uid not in pods:
                self._forget(uid, kill=True)
        for pod in pods.values():
            self._handle(pod)

    def _handle(self, pod) -> None:
        uid = pod.metadata.uid
        with self.lock:
            runner = self.pods.get(uid)
            if runner is None:
                if pod.status.phase in ("Succeeded", "Failed"):
                    if pod.metadata.deletion_timestamp:
                        self._final_delete(pod)
                    return
                runner = PodRunner(self, pod)
                self.pods[uid] = runner
                threading.Thread(target=runner.run, name=f"pod-{pod.metadata.name}", daemon=True).start()
        if pod.metadata.deletion_timestamp:
            runner.request_stop(pod.spec.termination_grace_period_seconds or 30)

    def _forget(self, uid: str, kill: bool) -> None:
        with self.lock:
            runner = self.pods.pop(uid, None)
        if runner and kill:
            runner.request_stop(0)

    def _final_delete(self, pod) -> None:
        try:
            self.core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace,
                                            grace_period_seconds=0,
                                            body=client.V1DeleteOptions(
                                                grace_period_seconds=0,
                                                preconditions=client.V1Preconditions(uid=pod.metadata.uid)))
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    # storage -------------------------------------------------------------------------
    def provisioner_loop(self) -> None:
        while True:
            try:
                self._provision_pending()
                self._delete_released()
            except Exception as e:  # noqa: BLE001 - the API server may be restarting
                log.warning("provisioner: %s", e)
            time.sleep(1)

    def _our_classes(self) -> dict[str, str]:
        return {sc.metadata.name: sc.reclaim_policy or "Delete"
                for sc in self.storage.list_storage_class().items if sc.provisioner == self.provisioner}

    def _provision_pending(self) -> None:
        classes = self._our_classes()
        for pvc in self.core.list_persistent_volume_claim_for_all_namespaces().items:
            if pvc.status.phase != "Pending" or pvc.spec.volume_name:
                continue
            if pvc.spec.storage_class_name not in classes:
                continue
            name = f"pvc-{pvc.metadata.uid}"
            path = self.volumes_dir / name
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)  # pods may run as any non-root user
            pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {
                "name": name, "annotations": {PROVISIONED_BY: self.provisioner}},
                "spec": {"capacity": {"storage": pvc.spec.resources.requests["storage"]},
                         "accessModes": pvc.spec.access_modes,
                         "persistentVolumeReclaimPolicy": classes[pvc.spec.storage_class_name],
                         "storageClassName": pvc.spec.storage_class_name,
                         "volumeMode": pvc.spec.volume_mode or "Filesystem",
                         "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                         "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                      "namespace": pvc.metadata.namespace, "name": pvc.metadata.name,
                                      "uid": pvc.metadata.uid}}}
            try:
                self.core.create_persistent_volume(pv)
                log.info("provisioned %s for %s/%s", name, pvc.metadata.namespace, pvc.metadata.name)
            except ApiException as e:
                if e.status != 409:
                    raise

    def _delete_released(self) -> None:
        for pv in self.core.list_persistent_volume().items:
            ann = pv.metadata.annotations or {}
            if (ann.get(PROVISIONED_BY) == self.provisioner and pv.status.phase == "Released"
                    and pv.spec.persistent_volume_reclaim_policy == "Delete"):
                shutil.rmtree(pv.spec.host_path.path, ignore_errors=True)
                try:
                    self.core.delete_persistent_volume(pv.metadata.name)
                except ApiException as e:
                    if e.status != 404:
                        raise

    def pv_path(self, claim: str, namespace: str) -> Path:
        pvc = self.core.read_namespaced_persistent_volume_claim(claim, namespace)
        if not pvc.spec.volume_name:
            raise RuntimeError(f"claim {namespace}/{claim} is not bound")
        pv = self.core.read_persistent_volume(pvc.spec.volume_name)
        if not pv.spec.host_path:
            raise RuntimeError(f"volume {pv.metadata.name} is not a hostPath volume")
        return Path(pv.spec.host_path.path)


class PodRunner:
    """Runs one pod's containers and reports their state."""

    def __init__(self, node: LocalNode, pod) -> None:
        self.node = node
        self.core = node.core
        self.pod = pod
        self.name, self.ns, self.uid = pod.metadata.name, pod.metadata.namespace, pod.metadata.uid
        self.dir = node.state_dir / "pods" / self.uid
        self.procs: dict[str, subprocess.Popen] = {}
        self.stop_event = threading.Event()
        self.grace = 30
        self.statuses: dict[str, dict] = {}
        self.ready: dict[str, bool] = {}

    def request_stop(self, grace: int) -> None:
        self.grace = grace
        self.stop_event.set()

    # status ----------------------------------------------------------------------------
    def _patch_status(self, phase: str | None = None, reason: str | None = None,
                      message: str | None = None) -> None:
        spec_containers = [c.name for c in self.pod.spec.containers]
        all_ready = all(self.ready.get(n) for n in spec_containers)
        t = now()
        cond = lambda typ, ok: {"type": typ, "status": "True" if ok else "False", "lastTransitionTime": t}  # noqa: E731
        status: dict = {
            "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [cond("PodScheduled", True), cond("Initialized", True),
                           cond("ContainersReady", all_ready), cond("Ready", all_ready)],
            "containerStatuses": [self.statuses[n] for n in spec_containers if n in self.statuses],
        }
        if self.pod.status.start_time is None:
            status["startTime"] = t
        if phase:
            status["phase"] = phase
        if reason:
            status["reason"] = reason
        if message:
            status["message"] = message
        try:
            self.core.patch_namespaced_pod_status(self.name, self.ns, {"status": status})
        except ApiException as e:
            if e.status != 404:
                log.warning("%s/%s: status patch failed: %s", self.ns, self.name, e.reason)

    def _container_status(self, c, state: dict, restarts: int = 0) -> None:
        self.statuses[c.name] = {"name": c.name, "image": c.image or "local", "imageID": "local://",
                                 "containerID": f"local://{self.uid}/{c.name}",
                                 "ready": self.ready.get(c.name, False), "started": "running" in state,
                                 "restartCount": restarts, "state": state}

    # volumes and env -------------------------------------------------------------------
    def _materialise_volumes(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for v in self.pod.spec.volumes or []:
            target = self.dir / "volumes" / v.name
            if v.persistent_volume_claim:
                paths[v.name] = self.node.pv_path(v.persistent_volume_claim.claim_name, self.ns)
                continue
            if v.host_path:
                paths[v.name] = Path(v.host_path.path)
                continue
            target.mkdir(parents=True, exist_ok=True)
            if v.projected:
                for src in v.projected.sources:
                    if src.service_account_token:
                        token = self._token(src.service_account_token)
                        (target / src.service_account_token.path).write_text(token)
                    else:
                        self._write_source(target, src.config_map, src.secret, src.downward_api)
            else:
                self._write_source(target, v.config_map, v.secret, v.downward_api)
            # emptyDir and anything else: an empty folder
            target.chmod(0o777)
            paths[v.name] = target
        return paths

    def _write_source(self, target: Path, config_map, secret, downward_api) -> None:
        """Files of a ConfigMap, Secret or downward API source (a volume or a projected source);
        a volume with none of them (emptyDir and the like) stays an empty folder."""
        if config_map:
            self._write_items(target, self._configmap(config_map.name, config_map.optional), config_map.items)
        elif secret:
            # A Secret volume names it `secretName`, a projected source `name`.
            name = getattr(secret, "secret_name", None) or getattr(secret, "name", None)
            self._write_items(target, self._secret(name, secret.optional), secret.items)
        elif downward_api:
            for item in downward_api.items:
                (target / item.path).write_text(self._field(item.field_ref.field_path))

    @staticmethod
    def _write_items(target: Path, data: dict[str, bytes], items) -> None:
        if items:
            data = {i.path: data[i.key] for i in items if i.key in data}
        for key, value in data.items():
            (target / key).parent.mkdir(parents=True, exist_ok=True)
            (target / key).write_bytes(value)

    def _configmap(self, name: str, optional: bool | None) -> dict[str, bytes]:
        try:
            cm = self.core.read_namespaced_config_map(name, self.ns)
        except ApiException as e:
            if e.status == 404 and optional:
                return {}
            raise
        out = {k: v.encode() for k, v in (cm.data or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()})
        return out

    def _secret(self, name: str, optional: bool | None) -> dict[str, bytes]:
        try:
            s = self.core.read_namespaced_secret(name, self.ns)
        except ApiException as e:
            if e.status == 404 and optional:
                return {}
            raise
        return {k: base64.b64decode(v) for k, v in (s.data or {}).items()}

    def _token(self, src) -> str:
        sa = self.pod.spec.service_account_name or "default"
        req = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[src.audience] if src.audience else [],
            expiration_seconds=src.expiration_seconds or 3600,
            bound_object_ref=client.V1BoundObjectReference(kind="Pod", api_version="v1",
                                                           name=self.name, uid=self.uid)))
        return self.core.create_namespaced_service_account_token(sa, self.ns, req).status.token

    def _field(self, path: str) -> str:
        m = self.pod.metadata
        simple = {"metadata.name": m.name, "metadata.namespace": m.namespace, "metadata.uid": m.uid,
                  "spec.nodeName": self.pod.spec.node_name,
                  "spec.serviceAccountName": self.pod.spec.service_account_name or "default",
                  "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
        if path in simple:
            return simple[path] or ""
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return ((m.labels if match.group(1) == "labels" else m.annotations) or {}).get(match.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            d = (m.labels if path == "metadata.labels" else m.annotations) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
        raise ValueError(f"unsupported fieldRef {path}")

    def _env(self, c) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.dir / "home"),
               "HOSTNAME": self.name, "KUBERNETES_SERVICE_HOST": self.node.api_host,
               "KUBERNETES_SERVICE_PORT": self.node.api_port, "PYTHONUNBUFFERED": "1",
               # What an image ships: this checkout's packages (not whichever checkout the
               # virtualenv was installed from), as the images put them on PYTHONPATH.
               "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / d) for d in SOURCE_DIRS)}
        Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
        for src in c.env_from or []:
            data = (self._configmap(src.config_map_ref.name, src.config_map_ref.optional) if src.config_map_ref
                    else self._secret(src.secret_ref.name, src.secret_ref.optional))
            env.update({(src.prefix or "") + k: v.decode() for k, v in data.items()})
        for e in c.env or []:
            if e.value_from is None:
                env[e.name] = _expand(e.value or "", env)
                continue
            vf = e.value_from
            if vf.field_ref:
                env[e.name] = self._field(vf.field_ref.field_path)
            elif vf.secret_key_ref:
                data = self._secret(vf.secret_key_ref.name, vf.secret_key_ref.optional)
                if vf.secret_key_ref.key in data:
                    env[e.name] = data[vf.secret_key_ref.key].decode()
                elif not vf.secret_key_ref.optional:
                    raise RuntimeError(f"secret {vf.secret_key_ref.name} has no key {vf.secret_key_ref.key}")
            elif vf.config_map_key_ref:
                data = self._configmap(vf.config_map_key_ref.name, vf.config_map_key_ref.optional)
                if vf.config_map_key_ref.key in data:
                    env[e.name] = data[vf.config_map_key_ref.key].decode()
            elif vf.resource_field_ref:
                env[e.name] = "1"
        return env

    # running ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            volumes = self._materialise_volumes()
        except Exception as e:  # noqa: BLE001 - report, as a kubelet reports a mount failure
            log.exception("%s/%s: volume setup failed", self.ns, self.name)
            for c in self.pod.spec.containers:
                self._container_status(c, {"waiting": {"reason": "CreateContainerConfigError",
                                                       "message": str(e)[:500]}})
            self._patch_status(phase="Pending")
            self.stop_event.wait()
            self.node._final_delete(self.pod)
            return
        for c in self.pod.spec.init_containers or []:
            code = self._run_container(c, volumes, init=True)
            if code != 0 or self.stop_event.is_set():
                self._finish()
                return
        threads = [threading.Thread(target=self._run_container, args=(c, volumes), daemon=True)
                   for c in self.pod.spec.containers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._finish()

    def _finish(self) -> None:
        codes = [s["state"].get("terminated", {}).get("exitCode", 1) for s in self.statuses.values()]
        phase = "Succeeded" if codes and all(c == 0 for c in codes) else "Failed"
        if self.stop_event.is_set() and self.pod.spec.restart_policy == "Always":
            phase = "Failed"
        self._patch_status(phase=phase)
        if self.stop_event.is_set():
            self.node._final_delete(self.pod)

    def _run_container(self, c, volumes: dict[str, Path], init: bool = False) -> int:
        restarts = 0
        while True:
            code = self._run_once(c, volumes, restarts)
            policy = self.pod.spec.restart_policy or "Always"
            if init or self.stop_event.is_set() or policy == "Never" or (policy == "OnFailure" and code == 0):
                return code
            restarts += 1
            # Crash-loop back-off, as a kubelet would (capped, shortened for a dev machine).
            if self.stop_event.wait(min(2 ** restarts, 30)):
                return code

    def _run_once(self, c, volumes: dict[str, Path], restarts: int) -> int:
        env = self._env(c)
        argv = [_expand(a, env) for a in list(c.command or []) + list(c.args or [])]
        cdir = self.dir / "containers" / c.name
        cdir.mkdir(parents=True, exist_ok=True)
        term_log = cdir / "termination-log"
        term_log.write_text("")
        term_log.chmod(0o666)
        for m in c.volume_mounts or []:
            if m.sub_path and not m.read_only:
                (volumes[m.name] / m.sub_path).mkdir(parents=True, exist_ok=True)  # as a kubelet does
        mounts = [{"source": str(volumes[m.name] / (m.sub_path or "")), "target": m.mount_path,
                   "readOnly": bool(m.read_only)} for m in c.volume_mounts or []]
        mounts.append({"source": str(term_log),
                       "target": c.termination_message_path or "/dev/termination-log", "readOnly": False})
        spec_file = cdir / "spec.json"
        # The environment by its real path: a checkout's .venv may be a link to it.
        keep = sorted({os.path.realpath(sys.prefix), str(REPO_ROOT)})
        spec_file.write_text(json.dumps({"argv": argv, "env": env, "mounts": mounts, "keep": keep,
                                         "workingDir": c.working_dir}))
        out = open(cdir / f"log-{restarts}.txt", "ab")
        started = now()
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", sys.executable, "-m",
                                 "finetune_devcluster.podexec", str(spec_file)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True,
                                env={"PATH": os.environ.get("PATH", ""),
                                     "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        out.close()
        self.procs[c.name] = proc
        log.info("%s/%s: started container %s (pid %d): %s", self.ns, self.name, c.name, proc.pid, argv[:6])
        self.ready[c.name] = c.readiness_probe is None and c.startup_probe is None
        self._container_status(c, {"running": {"startedAt": started}}, restarts)
        self._patch_status(phase="Running")
        stopper = threading.Thread(target=self._stop_when_asked, args=(proc,), daemon=True)
        stopper.start()
        self._probe_until_exit(c, proc, restarts, started)
        code = proc.wait()
        code = code if code >= 0 else 128 - code  # killed by signal N -> 128+N, as a runtime reports
        self.ready[c.name] = False
        message = term_log.read_text(errors="replace")[-4096:]
        if not message and c.termination_message_policy == "FallbackToLogsOnError" and code != 0:
            message = (cdir / f"log-{restarts}.txt").read_text(errors="replace")[-2048:]
        reason = "Completed" if code == 0 else ("OOMKilled" if code == 137 and self._oom() else "Error")
        terminated = {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": now(),
                      "containerID": f"local://{self.uid}/{c.name}"}
        if message:
            terminated["message"] = message
        self._container_status(c, {"terminated": terminated}, restarts)
        self.statuses[c.name]["lastState"] = {}
        log.info("%s/%s: container %s exited with %d", self.ns, self.name, c.name, code)
        self._patch_status()
        return code

    @staticmethod
    def _oom() -> bool:
        return False

    def _stop_when_asked(self, proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            if self.stop_event.wait(0.5):
                log.info("%s/%s: stopping pid %d (SIGTERM, then SIGKILL after %ss)", self.ns, self.name,
                         proc.pid, self.grace)
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    return
                try:
                    proc.wait(timeout=self.grace)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return

    def _probe_until_exit(self, c, proc: subprocess.Popen, restarts: int, started: str) -> None:
        probe = c.readiness_probe or c.startup_probe
        if probe is None or probe.http_get is None:
            return
        port = probe.http_get.port
        if isinstance(port, str) and not port.isdigit():
            port = next((p.container_port for p in c.ports or [] if p.name == port), 80)
        url = f"http://127.0.0.1:{port}{probe.http_get.path or '/'}"
        # As a kubelet: the startup probe's period until the container first passes, then the
        # readiness probe's (both at most 2 s here).
        startup = c.startup_probe if c.startup_probe is not None else probe
        period = lambda p: max(1, min(p.period_seconds or 10, 2))  # noqa: E731
        passed = False
        while proc.poll() is None:
            try:
                ok = urllib.request.urlopen(url, timeout=2).status < 400
            except Exception:  # noqa: BLE001 - not answering yet is simply not ready
                ok = False
            passed = passed or ok
            if ok != self.ready.get(c.name):
                self.ready[c.name] = ok
                self._container_status(c, {"running": {"startedAt": started}}, restarts)
                self._patch_status()
            time.sleep(period(probe if passed else startup))


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: `$$` is an escaped `$`, an unknown $(VAR) stays as it is."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--node-name", default="local")
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--volumes-dir", required=True, type=Path)
    p.add_argument("--storage-provisioner", required=True)
    p.add_argument("--provisioner-only", action="store_true",
                   help="serve the StorageClass only; a real kubelet runs the node (realnode.py)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = config.new_client_from_config(config_file=args.kubeconfig)
    node = LocalNode(api, args.node_name, args.state_dir, args.volumes_dir, args.storage_provisioner)
    loops = [node.provisioner_loop]
    if not args.provisioner_only:
        node.register()
        loops += [node.heartbeat_loop, node.pod_loop]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    for target in loops:
        threading.Thread(target=target, name=target.__name__, daemon=True).start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    log.info("stopping: terminating %d pods", len(node.pods))
    for runner in list(node.pods.values()):
        for proc in runner.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
