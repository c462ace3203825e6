"""A new adapter on a running server: from its job succeeding to the adapter answering,
against vLLM's own start-up, measured in the same run.

On a local control plane (the local node really runs vLLM's CPU build) with the serving
operator as a process: an InferenceService serving the tiny Llama model with one adapter
is created and timed until Ready and answering (`serverStart`: scheduling, vLLM's start-up,
the first adapter's load); vLLM's start-up alone is the container's start to its first
/health 200, read from the pod (`vllmStartup`). Then, `--rounds` times, a new FineTuneJob on
the shared claim is marked Succeeded and added the way the FineTuneJob handler does
(`ensure_for_finetunejob`), and the time until a completion with the new adapter succeeds
is `adapterToAnswer` (the goal: at most 10 s, and never a vLLM start-up). The pod's uid and
restart count are checked after every round.

Training is stood in for (a real PEFT adapter copied into each job's folder): what is
measured starts where training ends.

    flock /work/wt/vllm.lock .venv/bin/python bench/bench_runtime_adapter.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NS = "bench"
CLAIM = "team-adapters"
LOCAL = {"nodeSelector": {"finetune.dev/local-node": "true"},
         "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists"}]}


def _wait(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - keep polling until the deadline
            value = None
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def _get(cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def _apply(cluster, obj: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


def _job(cluster, name: str, model: Path) -> dict:
    body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"model": {"source": str(model)}, "method": {"type": "lora", "lora": {"r": 8}},
                     "dataset": {"source": "pvc://data/train.jsonl"}, "storage": {"existingClaim": CLAIM},
                     "deploy": {"inferenceService": "tiny", "gpus": 0, **LOCAL}}}
    _apply(cluster, body)
    cluster.kubectl("patch", "finetunejob", name, "-n", NS, "--subresource=status", "--type=merge", "-p",
                    json.dumps({"status": {"phase": "Succeeded", "completionTime": "2026-01-01T00:00:00Z"}}))
    return _get(cluster, "finetunejob", name, "-n", NS)


def _adapter(model: Path, out: Path) -> None:
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            "from peft import LoraConfig, get_peft_model\ntorch.manual_seed(0)\n"
            "m = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), LoraConfig(r=8, lora_alpha=16,"
            " target_modules=['q_proj', 'v_proj'], task_type='CAUSAL_LM', init_lora_weights=False))\n"
            "m.save_pretrained(sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", code, str(model), str(out)], check=True, timeout=300)


def _served(cluster, names: set[str]) -> bool:
    obj = _get(cluster, "inferenceservice", "tiny", "-n", NS)
    st = obj.get("status") or {}
    return (st.get("observedGeneration") == obj["metadata"]["generation"] and st.get("phase") == "Ready"
            and names <= set(st.get("servedModels") or []))


def _answers(client, model: str) -> bool:
    return client.completions.create(model=model, prompt="Repeat red", max_tokens=2).usage.completion_tokens > 0


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def measure(workdir: Path, rounds: int) -> dict:
    from openai import OpenAI

    from finetune_devcluster.cluster import Cluster, free_port
    from finetune_operator.serving import handlers
    from finetune_devcluster.tiny_model import build_tiny_model, default_cache_dir

    model = build_tiny_model(default_cache_dir())
    adapter = workdir / "adapter"
    _adapter(model, adapter)
    cluster = Cluster(workdir / "cluster")
    cluster.start()
    proc = None
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cluster.kubectl("create", "namespace", NS)
        log = open(workdir / "operator.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", NS,
                                 "--liveness", f"http://127.0.0.1:{free_port()}/healthz",
                                 "-m", "finetune_operator.serving.routes"],
                                stdout=log, stderr=subprocess.STDOUT, env=cluster.env(), cwd=REPO,
                                start_new_session=True)
        _apply(cluster, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "metadata": {"name": CLAIM, "namespace": NS},
                         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
        names = ["first"] + [f"new-{i}" for i in range(rounds)]
        pvc = _wait(lambda: (p := _get(cluster, "pvc", CLAIM, "-n", NS))["spec"].get("volumeName") and p, 60,
                    "the claim to bind")
        volume = Path(_get(cluster, "pv", pvc["spec"]["volumeName"])["spec"]["hostPath"]["path"])
        for name in names:
            shutil.copytree(adapter, volume / "jobs" / name / "artifacts" / "adapter")
        _job(cluster, "first", model)
        started = time.monotonic()
        _apply(cluster, {"apiVersion": "finetune.dev/v1alpha1", "kind": "InferenceService",
                         "metadata": {"name": "tiny", "namespace": NS},
                         "spec": {"model": {"source": str(model)},
                                  "adapters": [{"name": "first", "fineTuneJobRef": {"name": "first"}}],
                                  "resources": {"gpus": 0, "memory": "4Gi", **LOCAL},
                                  "vllm": {"maxModelLen": 256, "maxLoraRank": 8, "maxLoras": 4}}})
        client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", timeout=60, max_retries=0)
        _wait(lambda: _served(cluster, {"first"}) and _answers(client, "first"), 900, "the server")
        server_start = time.monotonic() - started
        [pod] = _get(cluster, "pods", "-n", NS, "-l", "finetune.dev/inferenceservice=tiny")["items"]
        running = pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
        ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")["lastTransitionTime"]
        vllm_startup = _ts(ready) - _ts(running)  # whole seconds: the API's timestamps
        times = []
        for name in names[1:]:
            job = _job(cluster, name, model)
            t0 = time.monotonic()
            handlers.ensure_for_finetunejob(job, cluster.api_client())
            _wait(lambda: _answers(client, name), 120, f"adapter {name} to answer", interval=0.05)
            times.append(round(time.monotonic() - t0, 2))
            _wait(lambda: _served(cluster, {name}), 60, f"status to list {name}")
        after = _get(cluster, "pod", pod["metadata"]["name"], "-n", NS)
        assert after["metadata"]["uid"] == pod["metadata"]["uid"], "the pod was replaced"
        assert after["status"]["containerStatuses"][0]["restartCount"] == 0, "vLLM restarted"
        return {"serverStartSeconds": round(server_start, 2), "vllmStartupSeconds": round(vllm_startup, 2),
                "adapterToAnswerSeconds": times, "adapterToAnswerMax": max(times),
                "ratioToVllmStartup": round(max(times) / vllm_startup, 3) if vllm_startup else None,
                "podRestarts": 0, "podReplaced": False, "rounds": rounds}
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtime_adapter.json")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rta-") as tmp:
        result = measure(Path(tmp), args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
