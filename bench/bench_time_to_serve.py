"""Time to serve: from training done to the InferenceService being Ready, minus vLLM itself.

Runs the demo's flow (examples/quickstart.yaml on a local control plane, trainer and vLLM
really running on the local node) and records, by polling every 0.25 s:

- `trainingDone`: the FineTuneJob leaves Training/Evaluating for Deploying;
- `isvcReady`: the InferenceService is Ready and serves the job's adapter.

Then it starts the very vLLM command the local node ran for the serving pod (its spec.json:
argv, env and mounts) alone, and times it from start to /health 200: `vllmStartup`. The
operator's overhead is `isvcReady - trainingDone - vllmStartup`: creating the
InferenceService, the Deployment, scheduling, the rollout and status propagation.

    .venv/bin/python bench/bench_time_to_serve.py [--out bench/results/time_to_serve.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from finetune_devcluster.cluster import free_port
from finetune_devcluster.demo import JOB, NAMESPACE, QUICKSTART, Demo

REPO = Path(__file__).resolve().parents[1]


def _phase(demo: Demo, kind: str) -> dict:
    out = demo.kubectl("get", kind, JOB, "-n", NAMESPACE, "-o", "json", check=False)
    return json.loads(out.stdout).get("status", {}) if out.returncode == 0 else {}


def measure_flow(demo: Demo, timeout: float) -> dict:
    demo.state_dir.mkdir(parents=True, exist_ok=True)
    demo.cluster.start()
    demo.install_operator()
    demo.prepare_workspace(demo.prepare_model())
    demo.kubectl("apply", "-f", str(QUICKSTART))
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        ftj = _phase(demo, "ftj")
        now = time.monotonic() - t0
        if "trainingDone" not in marks and ftj.get("phase") in ("Deploying", "Succeeded"):
            marks["trainingDone"] = now
        isvc = _phase(demo, "inferenceservice.finetune.dev")
        if "trainingDone" in marks and isvc.get("phase") == "Ready" and JOB in isvc.get("servedModels", []):
            marks["isvcReady"] = now
            break
        if ftj.get("phase") == "Failed":
            raise SystemExit(f"the FineTuneJob failed: {ftj.get('conditions')}")
        time.sleep(0.25)
    else:
        raise SystemExit(f"timed out; marks so far: {marks}")
    return marks


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
            time.sleep(0.25)
        raise SystemExit("vLLM alone never became healthy")
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "time_to_serve.json")
    p.add_argument("--timeout", type=float, default=1500)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tts-") as tmp:
        demo = Demo(Path(tmp) / "demo", metrics_port=free_port(), liveness_port=free_port())
        try:
            marks = measure_flow(demo, args.timeout)
        finally:
            demo.stop()
        startup = vllm_alone(demo, 600)
    serve = marks["isvcReady"] - marks["trainingDone"]
    result = {"trainingDoneSeconds": round(marks["trainingDone"], 2),
              "trainingDoneToReadySeconds": round(serve, 2),
              "vllmStartupSeconds": round(startup, 2),
              "operatorOverheadSeconds": round(serve - startup, 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
