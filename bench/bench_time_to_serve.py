"""Time to serve: from training done to the InferenceService being Ready, minus vLLM itself.

Runs the demo's flow (examples/quickstart.yaml on a local control plane, trainer and vLLM
really running on the local node) and records, from watches on the FineTuneJob, the
InferenceService, its Deployment and its pods (the moment each event reaches this process):

- `trainingDone`: the FineTuneJob leaves Training/Evaluating for Deploying;
- `isvcCreated`, `deploymentCreated`, `podCreated`, `podScheduled`, `containerStarted`,
  `podReady`, `deploymentReady`: the steps between (what the operator, the controllers, the
  scheduler and the node each take);
- `vllmHealthy`: vLLM's own /health answers 200 (polled every 0.1 s on the node's port);
- `isvcReady`: the InferenceService is Ready and serves the job's adapter;
- `ftjSucceeded`: the FineTuneJob follows (Deploying -> Succeeded).

Then it starts the very vLLM command the local node ran for the serving pod (its spec.json:
argv, env and mounts) alone, and times it from start to /health 200: `vllmStartup`. The
operator's overhead is `isvcReady - trainingDone - vllmStartup`: creating the
InferenceService, the Deployment, scheduling, the rollout and status propagation. vLLM's
start-up inside the flow (`containerStarted` -> `vllmHealthy`) is reported too: the rest of
the interval, `inFlowOverheadSeconds`, is everything but vLLM starting, whatever vLLM's speed
that time.

`--baseline-ref REF` runs the same flow first with the operator (and API) sources of git ref
REF, then with this checkout's, back to back in the same process (each followed by its own
vLLM-alone run), and writes both.

The dev cluster runs without its MLflow server and MinIO (the quickstart uses neither), so
their start-up does not compete for the CPUs during the measured interval.

    .venv/bin/python bench/bench_time_to_serve.py [--out bench/results/time_to_serve.json]
        [--baseline-ref REF]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from finetune_devcluster.cluster import free_port
from finetune_devcluster.demo import JOB, NAMESPACE, QUICKSTART, VLLM_PORT, Demo

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION = "finetune.dev", "v1alpha1"

# (from, to, what the step is) in the order they happen; the durations are `to - from`.
STEPS = (
    ("trainingDone", "isvcCreated", "operator: InferenceService created"),
    ("isvcCreated", "deploymentCreated", "operator: Deployment applied"),
    ("deploymentCreated", "podCreated", "Deployment + ReplicaSet controllers"),
    ("podCreated", "podScheduled", "scheduler"),
    ("podScheduled", "containerStarted", "node: volumes, container start"),
    ("containerStarted", "vllmHealthy", "vLLM start-up in the flow"),
    ("vllmHealthy", "podReady", "node: readiness probe"),
    ("podReady", "isvcReady", "operator: adapter loaded, Ready written"),
    ("isvcReady", "ftjSucceeded", "operator: FineTuneJob Succeeded"),
)


class Marks:
    """First-seen times (seconds since `t0`) of named moments, from several threads."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.at: dict[str, float] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.notes: list[str] = []

    def mark(self, name: str) -> None:
        with self.lock:
            if name not in self.at:
                self.at[name] = round(time.monotonic() - self.t0, 3)
                self.changed.notify_all()

    def note(self, text: str) -> None:
        with self.lock:
            self.notes.append(f"{time.monotonic() - self.t0:.2f}s {text}")

    def wait_for(self, name: str, timeout: float, failed=lambda: None) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while name not in self.at:
                problem = failed()
                if problem:
                    raise SystemExit(problem)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"timed out waiting for {name}; marks so far: {self.at}")
                self.changed.wait(min(left, 1.0))


def _ready(conditions: list[dict] | None, kind: str = "Ready") -> bool:
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions or [])


class Watcher:
    """Watches the job's objects and turns their events into marks."""

    def __init__(self, api, marks: Marks) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.marks = marks
        self.stop = threading.Event()
        self.failure: str | None = None
        self.pods: set[str] = set()
        self.generations: set[int] = set()

    def start(self) -> None:
        streams = [
            (self.custom.list_namespaced_custom_object, (GROUP, VERSION, NAMESPACE, "finetunejobs"), self._ftj),
            (self.custom.list_namespaced_custom_object, (GROUP, VERSION, NAMESPACE, "inferenceservices"),
             self._isvc),
            (self.apps.list_namespaced_deployment, (NAMESPACE,), self._deployment),
            (self.core.list_namespaced_pod, (NAMESPACE,), self._pod),
        ]
        for fn, args, on_event in streams:
            threading.Thread(target=self._watch, args=(fn, args, on_event), daemon=True).start()
        threading.Thread(target=self._poll_health, daemon=True).start()

    def _watch(self, fn, args, on_event) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            try:
                for event in watch.Watch().stream(fn, *args, timeout_seconds=30):
                    obj = event["object"]
                    if not isinstance(obj, dict):
                        obj = fn.__self__.api_client.sanitize_for_serialization(obj)
                    on_event(event["type"], obj)
                    if self.stop.is_set():
                        return
            except Exception as exc:  # noqa: BLE001 - the API server restarting: watch again
                if not self.stop.is_set():
                    self.marks.note(f"watch {fn.__name__}: {exc}")
                    self.stop.wait(0.2)

    def _ftj(self, _type: str, obj: dict) -> None:
        if obj["metadata"]["name"] != JOB:
            return
        phase = (obj.get("status") or {}).get("phase")
        if phase:
            self.marks.mark(f"ftj:{phase}")
        if phase in ("Deploying", "Succeeded"):
            self.marks.mark("trainingDone")
        if phase == "Succeeded":
            self.marks.mark("ftjSucceeded")
        if phase == "Failed":
            self.failure = f"the FineTuneJob failed: {(obj.get('status') or {}).get('conditions')}"

    def _isvc(self, _type: str, obj: dict) -> None:
        if obj["metadata"]["name"] != JOB:
            return
        self.marks.mark("isvcCreated")
        status = obj.get("status") or {}
        if status.get("phase"):
            self.marks.mark(f"isvc:{status['phase']}")
        for c in status.get("conditions") or []:
            if c.get("type") == "Ready":
                self.marks.mark(f"isvc:Ready={c.get('status')}:{c.get('reason')}")
        if status.get("phase") == "Ready" and JOB in status.get("servedModels", []):
            self.marks.mark("isvcReady")

    def _deployment(self, _type: str, obj: dict) -> None:
        if obj["metadata"]["name"] != JOB:
            return
        self.marks.mark("deploymentCreated")
        self.generations.add(obj["metadata"].get("generation", 0))
        if ((obj.get("status") or {}).get("readyReplicas") or 0) >= 1:
            self.marks.mark("deploymentReady")

    def _pod(self, _type: str, obj: dict) -> None:
        labels = obj["metadata"].get("labels") or {}
        if labels.get("finetune.dev/inferenceservice") != JOB:
            return
        self.pods.add(obj["metadata"]["name"])
        self.marks.mark("podCreated")
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        if spec.get("nodeName") or spec.get("node_name"):
            self.marks.mark("podScheduled")
        statuses = status.get("containerStatuses") or status.get("container_statuses") or []
        if any((s.get("state") or {}).get("running") for s in statuses):
            self.marks.mark("containerStarted")
        if _ready(status.get("conditions")):
            self.marks.mark("podReady")

    def _poll_health(self) -> None:
        """vLLM's own readiness, as seen from the node (pods there share its network)."""
        url = f"http://127.0.0.1:{VLLM_PORT}/health"
        while not self.stop.is_set():
            if "containerStarted" in self.marks.at:
                try:
                    if urllib.request.urlopen(url, timeout=1).status == 200:
                        self.marks.mark("vllmHealthy")
                        return
                except OSError:
                    pass
            self.stop.wait(0.1)


def measure_flow(demo: Demo, timeout: float) -> tuple[dict, dict]:
    demo.state_dir.mkdir(parents=True, exist_ok=True)
    demo.cluster.start()
    demo.install_operator()
    demo.prepare_workspace(demo.prepare_model())
    marks = Marks()
    watcher = Watcher(demo.cluster.api_client(), marks)
    watcher.start()
    demo.kubectl("apply", "-f", str(QUICKSTART))
    failed = lambda: watcher.failure  # noqa: E731
    try:
        marks.wait_for("trainingDone", timeout, failed)
        marks.wait_for("isvcReady", timeout, failed)
        try:
            marks.wait_for("ftjSucceeded", 120, failed)
        except SystemExit as exc:
            marks.note(f"no Succeeded: {exc}")
        marks.wait_for("vllmHealthy", 10)
    finally:
        watcher.stop.set()
    extra = {"servingPods": len(watcher.pods), "deploymentGenerations": sorted(watcher.generations),
             "notes": marks.notes}
    return dict(marks.at), extra


def vllm_alone(demo: Demo, timeout: float) -> float:
    """Start the serving pod's own command (as the local node ran it) and time it to /health."""
    specs = sorted((demo.cluster.state_dir / "local-node" / "pods").glob("*/containers/vllm/spec.json"),
                   key=lambda p: p.stat().st_mtime)
    spec = json.loads(specs[-1].read_text())
    argv = spec["argv"]
    port = argv[argv.index("--port") + 1]
    started = time.monotonic()
    with open(demo.state_dir / "vllm-alone.log", "wb") as log:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", sys.executable, "-m",
                                 "finetune_devcluster.podexec", str(specs[-1])],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "hack")})
    try:
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"vLLM exited with {proc.returncode}; see {demo.state_dir / 'vllm-alone.log'}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("vLLM alone never became healthy")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def summarise(marks: dict, extra: dict, startup: float, load: tuple[float, float]) -> dict:
    serve = marks["isvcReady"] - marks["trainingDone"]
    in_flow = marks["vllmHealthy"] - marks["containerStarted"]
    steps = {f"{a} -> {b}": round(marks[b] - marks[a], 2) for a, b, _ in STEPS if a in marks and b in marks}
    return {"trainingDoneSeconds": round(marks["trainingDone"], 2),
            "trainingDoneToReadySeconds": round(serve, 2),
            "vllmStartupSeconds": round(startup, 2),
            "operatorOverheadSeconds": round(serve - startup, 2),
            "vllmStartupInFlowSeconds": round(in_flow, 2),
            "inFlowOverheadSeconds": round(serve - in_flow, 2),
            "readyToSucceededSeconds": round(marks["ftjSucceeded"] - marks["isvcReady"], 2)
            if "ftjSucceeded" in marks else None,
            "steps": steps,
            "marks": dict(sorted(marks.items(), key=lambda kv: kv[1])),
            **extra,
            "loadAverage1mBeforeAfter": [round(x, 2) for x in load]}


def run_once(label: str, timeout: float, pythonpath: str | None = None) -> dict:
    """One flow and one vLLM-alone run; `pythonpath` replaces the operator's PYTHONPATH."""
    saved = os.environ.get("PYTHONPATH")
    if pythonpath is not None:
        os.environ["PYTHONPATH"] = pythonpath
    load_before = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="tts-") as tmp:
            demo = Demo(Path(tmp) / "demo", metrics_port=free_port(), liveness_port=free_port())
            demo.cluster.mlflow = demo.cluster.s3 = False  # unused by the quickstart: no CPU for them
            try:
                marks, extra = measure_flow(demo, timeout)
            finally:
                demo.stop()
            startup = vllm_alone(demo, 600)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    result = summarise(marks, extra, startup, (load_before, os.getloadavg()[0]))
    print(f"== {label}: " + json.dumps({k: v for k, v in result.items() if k != "marks"}, indent=2),
          file=sys.stderr, flush=True)
    return result


def baseline_pythonpath(ref: str, into: Path) -> str:
    """PYTHONPATH with the api and operator sources of git ref `ref` first (exported into `into`)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "api", "operator"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
               if p and Path(p).resolve() not in (REPO / "api", REPO / "operator")]
    return os.pathsep.join([str(into / "api"), str(into / "operator"), *current])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "time_to_serve.json")
    p.add_argument("--timeout", type=float, default=1500)
    p.add_argument("--baseline-ref", help="first run the flow with this git ref's operator, then this checkout's")
    args = p.parse_args(argv)
    result: dict = {}
    if args.baseline_ref:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.baseline_ref], check=True,
                                capture_output=True, text=True).stdout.strip()
        with tempfile.TemporaryDirectory(prefix="tts-baseline-") as tmp:
            result["baseline"] = {"ref": args.baseline_ref, "commit": commit,
                                  **run_once(f"baseline {args.baseline_ref}", args.timeout,
                                             baseline_pythonpath(args.baseline_ref, Path(tmp)))}
    result.update(run_once("this checkout", args.timeout))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
