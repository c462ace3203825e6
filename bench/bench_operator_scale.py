"""The operator at scale: N FineTuneJobs created at once on 200 fake 8-GPU nodes.

    PYTHONPATH=api:operator:trainer_image:hack:. .venv/bin/python bench/bench_operator_scale.py \
        [--sizes 100 300 1000] [--baseline-ref COMMIT] [--out bench/results/operator_scale.json]

A fresh local control plane of its own (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok; no local node), 200 kwok GPU nodes, one pre-bound claim per namespace
(`storage.existingClaim`, so no provisioner is needed). For each N:

- the anchor: N bare Jobs with the trainer's pod shape, created at once, with no operator
  running: Job created -> its pod created (the built-in Job controller), pod done -> Job
  Complete;
- the operator (`python -m finetune_operator --namespace <ns>`, default resync): N
  FineTuneJobs created at once: FineTuneJob created -> its Job created, all Jobs exist,
  trainer pod Succeeded -> FineTuneJob Succeeded; the operator's CPU seconds and peak RSS
  (/proc); its API requests, counted from the API server's audit log (the operator runs
  with a client certificate of its own, `CN=finetune-operator`): per FineTuneJob until all
  succeeded, then per FineTuneJob per minute once they are all finished.

Times are taken by this process from watch events (creationTimestamp has one-second
resolution), so watch delivery is in every figure, the operator's and the anchor's alike.
With --baseline-ref, the operator at that commit (`git archive`, put first on PYTHONPATH)
runs the same N in the same control plane, before the current tree: before/after side by side.
The later of two runs is the slower (an A/A pair differed by 28% in p99 and 10% in CPU), so
compare with --abba (base, current, current, base) and average each tree's two runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for sub in ("api", "hack", "operator", "trainer_image", "."):
    sys.path.insert(0, str(REPO / sub))

from finetune_devcluster import manifests  # noqa: E402
from finetune_devcluster.cluster import Cluster, free_port  # noqa: E402

OPERATOR_USER = "finetune-operator"
JOB_CONTROLLER_USER = "system:serviceaccount:kube-system:job-controller"
NODES = 200
CLAIM = "shared"


class AuditedCluster(Cluster):
    """The dev cluster plus an audit log of the operator's and the Job controller's requests."""

    @property
    def audit_log(self) -> Path:
        return self.logs / "audit.jsonl"

    def _apiserver(self):
        comp = super()._apiserver()
        policy = self.state_dir / "audit-policy.yaml"
        policy.write_text(json.dumps({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [{"level": "Metadata", "users": [OPERATOR_USER, JOB_CONTROLLER_USER]},
                      {"level": "None"}]}))
        comp.argv += [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                      "--audit-log-format=json", "--audit-log-mode=batch", "--audit-log-maxsize=0"]
        return comp

    def operator_kubeconfig(self) -> Path:
        """A kubeconfig with the operator's own client certificate (still system:masters)."""
        import yaml

        self._signed("operator", f"/O=system:masters/CN={OPERATOR_USER}", "client.ext")
        cfg = yaml.safe_load(self.kubeconfig.read_text())
        cfg["users"][0]["user"] = {"client-certificate": str(self.pki / "operator.crt"),
                                   "client-key": str(self.pki / "operator.key")}
        path = self.state_dir / "operator.kubeconfig"
        path.write_text(yaml.safe_dump(cfg))
        return path


def audit_events(path: Path, since: float, until: float, user: str) -> list[dict]:
    """Audit events of `user` whose request was received in [since, until] (epoch seconds)."""
    import datetime as dt

    out = []
    with path.open() as f:
        for line in f:
            if f'"{user}"' not in line:
                continue
            ev = json.loads(line)
            if ev.get("user", {}).get("username") != user:
                continue
            t = dt.datetime.fromisoformat(ev["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            if since <= t <= until:
                out.append(ev)
    return out


def by_verb_resource(events: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ev in events:
        ref = ev.get("objectRef") or {}
        key = f"{ev['verb']} {ref.get('resource', ev.get('requestURI', '?'))}" + \
              (f"/{ref['subresource']}" if ref.get("subresource") else "")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# --- watching -------------------------------------------------------------------------------------


class Watcher(threading.Thread):
    """Streams one watch and calls `on_event(type, obj, monotonic_time)` per event."""

    def __init__(self, api, path: str, on_event) -> None:
        super().__init__(daemon=True)
        self.api, self.path, self.on_event = api, path, on_event
        self.ready = threading.Event()
        self.stopped = False

    def run(self) -> None:
        import urllib3
        from kubernetes.watch.watch import iter_resp_lines

        while not self.stopped:
            host = self.api.configuration.host
            resp = self.api.rest_client.pool_manager.request(
                "GET", f"{host}{self.path}?watch=true&timeoutSeconds=3600", preload_content=False,
                timeout=urllib3.Timeout(connect=10, read=3700))
            self.ready.set()
            try:
                for line in iter_resp_lines(resp):
                    now = time.monotonic()
                    ev = json.loads(line)
                    self.on_event(ev["type"], ev["object"], now)
                    if self.stopped:
                        break
            except Exception:  # noqa: BLE001 - reconnect
                if self.stopped:
                    return
            finally:
                resp.release_conn()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return round(values[k], 3)


def dist(values: list[float]) -> dict:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95), "p99": pct(values, 99),
            "max": round(max(values), 3) if values else None,
            "mean": round(statistics.fmean(values), 3) if values else None}


# --- objects --------------------------------------------------------------------------------------


def gpu_node_names() -> list[str]:
    return [f"gpu-node-{i}" for i in range(NODES)]


def add_gpu_nodes(cluster: Cluster, api) -> None:
    from kubernetes import client

    have = {"gpu-node-0", "gpu-node-1"}
    names = [n for n in gpu_node_names() if n not in have]
    docs = manifests.nodes(tuple(names), ())
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    core = client.CoreV1Api(api)
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: core.patch_node_status(n, manifests.node_status(n, True)), names))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ready = sum(1 for n in core.list_node().items if n.metadata.name.startswith("gpu-node-") and any(
            c.type == "Ready" and c.status == "True" for c in (n.status.conditions or [])))
        if ready >= NODES:
            return
        time.sleep(1)
    raise RuntimeError(f"only {ready} of {NODES} GPU nodes became Ready")


def drop_namespace(cluster: Cluster, ns: str, timeout: float = 900) -> None:
    """Delete a run's namespace and wait until it is gone, so that the next run (a baseline's
    "after", or the next size) starts on an empty cluster: the garbage collector deleting
    N jobs' children, and pods still holding GPUs, shared the control plane's CPUs with it (a
    before/after at N=1000 in session 9 compared two runs of which only the second paid that)."""
    started = time.monotonic()
    out = cluster.kubectl("delete", "namespace", ns, "--wait=true", f"--timeout={int(timeout)}s",
                          check=False, timeout=timeout + 30)
    note = "" if out.returncode == 0 else f" (not gone: {out.stderr.strip()[:200]})"
    print(f"namespace {ns} deleted in {time.monotonic() - started:.0f}s{note}", file=sys.stderr)


def make_namespace(cluster: Cluster, ns: str) -> None:
    cluster.kubectl("create", "namespace", ns)
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{ns}-{CLAIM}"},
          "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                   "persistentVolumeReclaimPolicy": "Retain",
                   "hostPath": {"path": str(cluster.volumes / ns)},
                   "claimRef": {"namespace": ns, "name": CLAIM}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM, "namespace": ns},
           "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": f"{ns}-{CLAIM}",
                    "resources": {"requests": {"storage": "10Gi"}}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pv, pvc]}))
    cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Bound", f"pvc/{CLAIM}", "-n", ns, "--timeout=60s")
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "sa", "default", "-n", ns, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no default ServiceAccount in {ns}")
        time.sleep(0.2)


def finetunejob(name: str) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"source": "org/tiny"},
                     "dataset": {"source": f"pvc://{CLAIM}/data/train.jsonl"},
                     "resources": {"gpusPerNode": 1},
                     "training": {"precision": "fp32"},
                     "storage": {"existingClaim": CLAIM}}}


def bare_job(name: str) -> dict:
    """The trainer's pod shape (GPU node pool, toleration, one GPU), no operator involved."""
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 3, "template": {"metadata": {"labels": {"bench": "bare"}}, "spec": {
                "restartPolicy": "Never",
                "nodeSelector": {manifests.GPU_LABEL: "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{"name": "trainer", "image": "finetune-trainer:test",
                                "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
                "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": CLAIM}}]}}}}


def create_all(create, bodies: list[dict], threads: int = 8) -> dict[str, float]:
    """POST every body from a thread pool; returns name -> monotonic time the POST returned."""
    done: dict[str, float] = {}

    def one(body):
        create(body)
        done[body["metadata"]["name"]] = time.monotonic()

    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, bodies))
    return done


def wait_until(predicate, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


# --- the operator as a process --------------------------------------------------------------------


class Operator:
    def __init__(self, cluster: AuditedCluster, kubeconfig: Path, ns: str, log: Path,
                 pythonpath_first: Path | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.metrics_port, self.liveness_port = free_port(), free_port()
        env = {**cluster.env(), "KUBECONFIG": str(kubeconfig)}
        if pythonpath_first:
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath_first), str(REPO / "api"), str(REPO / "trainer_image")])
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "finetune_operator", "--namespace", ns,
                 "--metrics-port", str(self.metrics_port), "--liveness-port", str(self.liveness_port),
                 "--trainer-image", "finetune-trainer:test", "--log-level", "INFO", *extra_args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                start_new_session=True)
        import urllib.request

        def healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"the operator exited {self.process.returncode}; see {log}")
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2).status == 200
            except OSError:
                return False
        wait_until(healthy, 60, "the operator's liveness endpoint")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)


# --- the two runs ---------------------------------------------------------------------------------


def run_bare_jobs(cluster: AuditedCluster, api, n: int, timeout: float) -> dict:
    from kubernetes import client

    ns = f"bare-{n}"
    make_namespace(cluster, ns)
    job_added: dict[str, float] = {}
    pod_added: dict[str, float] = {}
    pod_done: dict[str, float] = {}
    job_complete: dict[str, float] = {}
    lock = threading.Lock()

    def on_job(kind, obj, t):
        name = obj["metadata"]["name"]
        with lock:
            job_added.setdefault(name, t)
            if any(c.get("type") == "Complete" and c.get("status") == "True"
                   for c in (obj.get("status") or {}).get("conditions") or []):
                job_complete.setdefault(name, t)

    def on_pod(kind, obj, t):
        owner = (obj["metadata"].get("labels") or {}).get("job-name")
        if not owner:
            return
        with lock:
            pod_added.setdefault(owner, t)
            if (obj.get("status") or {}).get("phase") == "Succeeded":
                pod_done.setdefault(owner, t)

    watchers = [Watcher(api, f"/apis/batch/v1/namespaces/{ns}/jobs", on_job),
                Watcher(api, f"/api/v1/namespaces/{ns}/pods", on_pod)]
    for w in watchers:
        w.start()
        w.ready.wait(10)
    batch = client.BatchV1Api(api)
    wall0, t0 = time.time(), time.monotonic()
    created = create_all(lambda b: batch.create_namespaced_job(ns, b, _preload_content=False),
                         [bare_job(f"job-{i:04d}") for i in range(n)])
    t_created = time.monotonic()
    wait_until(lambda: len(pod_added) >= n, timeout, f"pods of {n} bare Jobs")
    t_pods = max(pod_added.values())
    wait_until(lambda: len(job_complete) >= n, timeout, f"{n} bare Jobs to complete")
    wall1 = time.time()
    for w in watchers:
        w.stopped = True
    requests = audit_events(cluster.audit_log, wall0, wall1, JOB_CONTROLLER_USER)
    return {
        "n": n,
        "create_seconds": round(t_created - t0, 3),
        "job_created_to_pod_created_s": dist([pod_added[k] - created[k] for k in created]),
        "all_pods_exist_after_s": round(t_pods - t0, 3),
        "pod_succeeded_to_job_complete_s": dist([job_complete[k] - pod_done[k] for k in job_complete if k in pod_done]),
        "job_controller_requests_per_job": round(len(requests) / n, 2),
        "job_controller_requests": by_verb_resource(requests),
    }


def run_operator(cluster: AuditedCluster, api, kubeconfig: Path, n: int, timeout: float, steady: float,
                 label: str, pythonpath_first: Path | None = None, profile_dir: Path | None = None,
                 profile_rate: int = 50, profile_seconds: float | None = None) -> dict:
    from kubernetes import client

    ns = f"ftj-{label}-{n}"
    make_namespace(cluster, ns)
    ftj_phase: dict[str, float] = {}
    job_added: dict[str, float] = {}
    pod_done: dict[str, float] = {}
    lock = threading.Lock()

    def on_ftj(kind, obj, t):
        if (obj.get("status") or {}).get("phase") == "Succeeded":
            with lock:
                ftj_phase.setdefault(obj["metadata"]["name"], t)

    def on_job(kind, obj, t):
        owner = (obj["metadata"].get("labels") or {}).get("finetune.dev/finetunejob")
        if owner:
            with lock:
                job_added.setdefault(owner, t)

    def on_pod(kind, obj, t):
        owner = (obj["metadata"].get("labels") or {}).get("finetune.dev/finetunejob")
        if owner and (obj.get("status") or {}).get("phase") == "Succeeded":
            with lock:
                pod_done.setdefault(owner, t)

    watchers = [Watcher(api, f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs", on_ftj),
                Watcher(api, f"/apis/batch/v1/namespaces/{ns}/jobs", on_job),
                Watcher(api, f"/api/v1/namespaces/{ns}/pods", on_pod)]
    for w in watchers:
        w.start()
        w.ready.wait(10)
    op = Operator(cluster, kubeconfig, ns, cluster.logs / f"operator-{ns}.log", pythonpath_first)
    spy = None
    if profile_dir is not None:
        # Sampled stacks of the thread holding the GIL (py-spy --gil, profile_rate Hz), as folded
        # text: where the operator's Python CPU goes. Without --gil every thread not seen idle is
        # sampled, threads waiting for the GIL or in SSL reads too, and shares of samples are not
        # shares of CPU (session 10: three fixes worth "22% of busy samples" saved 5% of CPU).
        profile_dir.mkdir(parents=True, exist_ok=True)
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(op.process.pid),
                                "--rate", str(profile_rate), "--format", "raw", "--nonblocking", "--gil",
                                "--output", str(profile_dir / f"{ns}.folded")]
                               # Only the first seconds: the creation burst (FineTuneJob -> Job).
                               + (["--duration", str(int(profile_seconds))] if profile_seconds else []),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)  # let its watches settle; what it does idle is not the N FineTuneJobs' cost
        custom = client.CustomObjectsApi(api)
        cpu0, wall0, t0 = op.cpu_seconds(), time.time(), time.monotonic()
        rss_samples: list[float] = []
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                rss_samples.append(op.rss_mib())
                sampling.wait(1)
        threading.Thread(target=sample, daemon=True).start()
        created = create_all(lambda b: custom.create_namespaced_custom_object(
            "finetune.dev", "v1alpha1", ns, "finetunejobs", b, _preload_content=False),
            [finetunejob(f"ft-{i:04d}") for i in range(n)])
        t_created = time.monotonic()
        try:
            wait_until(lambda: len(job_added) >= n, timeout, f"the Jobs of {n} FineTuneJobs")
            t_jobs = max(job_added.values())
            wait_until(lambda: len(ftj_phase) >= n, timeout, f"{n} FineTuneJobs to succeed")
            t_done = max(ftj_phase.values())
            error = None
        except TimeoutError as e:
            t_jobs = max(job_added.values()) if len(job_added) >= n else None
            t_done = None
            error = str(e)
        cpu1, wall1 = op.cpu_seconds(), time.time()
        time.sleep(steady)
        cpu2, wall2 = op.cpu_seconds(), time.time()
        sampling.set()
        peak = op.peak_rss_mib()
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        op.stop()
        for w in watchers:
            w.stopped = True
    active = audit_events(cluster.audit_log, wall0, wall1, OPERATOR_USER)
    idle = audit_events(cluster.audit_log, wall1, wall2, OPERATOR_USER)
    return {
        "n": n,
        "operator": label,
        "error": error,
        "create_seconds": round(t_created - t0, 3),
        "ftj_created_to_job_created_s": dist([job_added[k] - created[k] for k in job_added if k in created]),
        "all_jobs_exist_after_s": round(t_jobs - t0, 3) if t_jobs else None,
        "pod_succeeded_to_ftj_succeeded_s": dist([ftj_phase[k] - pod_done[k] for k in ftj_phase if k in pod_done]),
        "all_succeeded_after_s": round(t_done - t0, 3) if t_done else None,
        "operator_cpu_seconds": round(cpu1 - cpu0, 2),
        "operator_cpu_seconds_per_ftj": round((cpu1 - cpu0) / n, 4),
        "operator_peak_rss_mib": peak,
        "operator_rss_end_mib": rss_samples[-1] if rss_samples else None,
        "requests_per_ftj_until_succeeded": round(len(active) / n, 2),
        "requests_until_succeeded": by_verb_resource(active),
        "after_succeeded": {"seconds": round(wall2 - wall1, 1),
                            "requests_per_ftj_per_minute": round(len(idle) / n / (wall2 - wall1) * 60, 2),
                            "operator_cpu_share": round((cpu2 - cpu1) / (wall2 - wall1), 3),
                            "requests": by_verb_resource(idle)},
    }


def prepare(cluster: AuditedCluster):
    """CRDs, the GPU nodes, a client for this process and the operator's kubeconfig."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    cluster.wait_established("finetunejobs.finetune.dev")
    api = cluster.api_client()
    api.configuration.connection_pool_maxsize = 32
    api.rest_client.pool_manager.connection_pool_kw["maxsize"] = 32
    add_gpu_nodes(cluster, api)
    return api, cluster.operator_kubeconfig()


def baseline_tree(ref: str, into: Path) -> Path:
    """The operator package at `ref`, for the before/after comparison."""
    archive = subprocess.run(["git", "archive", ref, "operator/finetune_operator"], cwd=REPO,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "operator"


def summary_line(r: dict) -> str:
    if "operator" not in r:
        d = r["job_created_to_pod_created_s"]
        return (f"bare Jobs   N={r['n']:>5}  Job->pod p50 {d['p50']:.2f}s p95 {d['p95']:.2f}s p99 {d['p99']:.2f}s"
                f"  all pods {r['all_pods_exist_after_s']:.1f}s  job-controller req/Job {r['job_controller_requests_per_job']}")
    d, s = r["ftj_created_to_job_created_s"], r["pod_succeeded_to_ftj_succeeded_s"]
    return (f"{r['operator']:<10}  N={r['n']:>5}  FTJ->Job p50 {d['p50']}s p95 {d['p95']}s p99 {d['p99']}s"
            f"  all Jobs {r['all_jobs_exist_after_s']}s  pod->Succeeded p50 {s['p50']}s p95 {s['p95']}s"
            f"  CPU {r['operator_cpu_seconds']}s  RSS {r['operator_peak_rss_mib']}MiB"
            f"  req/FTJ {r['requests_per_ftj_until_succeeded']}"
            f"  idle req/FTJ/min {r['after_succeeded']['requests_per_ftj_per_minute']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--baseline-ref", help="also run the operator at this commit (before/after)")
    parser.add_argument("--abba", action="store_true", help="with --baseline-ref: base, current, current, "
                        "base (the later of two runs in one control plane is the slower)")
    parser.add_argument("--baseline-sizes", type=int, nargs="+", help="sizes for the baseline (default: --sizes)")
    parser.add_argument("--timeout", type=float, default=420, help="per run, seconds")
    parser.add_argument("--steady", type=float, default=30, help="seconds observed after all succeeded")
    parser.add_argument("--profile", help="write py-spy profiles of the operator into this folder (py-spy "
                        "takes most of a CPU: a profiled run's latencies are not comparable with others)")
    parser.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second (its CPU "
                        "grows with the rate and the operator's thread count: 50 Hz took 62%% of a CPU at N=1000)")
    parser.add_argument("--profile-seconds", type=float, help="profile only this long from the operator's "
                        "start (e.g. 55: the creation burst at N=1000)")
    parser.add_argument("--state-dir", help="control-plane state (default: a temporary directory)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "operator_scale.json"))
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    # No MLflow or MinIO: the operator under test uses neither, and they would share its CPUs.
    cluster = AuditedCluster(args.state_dir or tmp / "cluster", local_node=False, mlflow=False, s3=False)
    started = time.monotonic()
    cluster.start()
    results: list[dict] = []
    try:
        api, kubeconfig = prepare(cluster)
        print(f"control plane with {NODES} GPU nodes up in {time.monotonic() - started:.0f}s", file=sys.stderr)
        baseline = baseline_tree(args.baseline_ref, tmp) if args.baseline_ref else None
        for n in args.sizes:
            r = run_bare_jobs(cluster, api, n, args.timeout)
            print(summary_line(r), file=sys.stderr)
            results.append(r)
            drop_namespace(cluster, f"bare-{n}")
            paired = baseline is not None and n in (args.baseline_sizes or args.sizes)
            base_label = f"base-{args.baseline_ref[:7]}" if paired else ""
            # A run after another in the same control plane is slower (etcd holds the earlier
            # run's history: an A/A pair of one tree, bench/results/operator_scale_1000_s12_aa.json,
            # was 16.2 -> 20.8 s p99 and 67.6 -> 74.5 CPU-s). --abba runs base, current, current,
            # base: each tree once first and once last.
            order = [(base_label, baseline), ("current", None)] if paired else [("current", None)]
            if paired and args.abba:
                order += [("current-2", None), (f"{base_label}-2", baseline)]
            for label, tree in order:
                r = run_operator(cluster, api, kubeconfig, n, args.timeout, args.steady, label, tree,
                                 Path(args.profile) if args.profile else None, args.profile_rate,
                                 args.profile_seconds)
                print(summary_line(r), file=sys.stderr)
                results.append(r)
                drop_namespace(cluster, f"ftj-{label}-{n}")
    finally:
        cluster.stop()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "operator scale: N FineTuneJobs at once on 200 kwok 8-GPU nodes; anchor: N bare Jobs",
        "commit": head, "baseline_ref": args.baseline_ref,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "loadAverage1m": round(os.getloadavg()[0], 2),
        "seconds": round(time.monotonic() - started, 1),
        "results": results,
    }, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
