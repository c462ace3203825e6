"""`make demo`: the whole pipeline on this machine, for real.

1. start the local control plane (state in `.demo/`);
2. install the CRDs and the chart's ServiceAccount and RBAC, and run the operator as a local
   process with that ServiceAccount's token (not the admin credential);
3. build a tiny Llama-architecture base model (no internet) and copy it, with the dataset
   from examples/data/, onto the job's claim;
4. apply examples/quickstart.yaml; the trainer pod really runs on the local node, and when
   it succeeds the operator creates the InferenceService `quickstart` there (vLLM, CPU);
5. show progress while it trains, wait for vLLM to serve the adapter, and print the
   adapter's answers next to the base model's for held-out prompts;
6. start OpenAI's fine-tuning API (`finetune-operator api`, with the chart's ServiceAccount
   and RBAC for it) for the namespace `demo`, issue an API key, and print the `export` lines
   with which OpenAI's own fine-tuning quick-start runs against it.

`make demo-down` stops everything it started and removes `.demo/`.

`make demo` sets `FINETUNE_NODE=kubelet` unless told otherwise (`FINETUNE_NODE=local make
demo`: the stand-in node, as the steps above describe). With `FINETUNE_NODE=kubelet` the
`local` node is a real kubelet with containerd (see `realnode.py`): the demo builds the project's images (`make images`), installs the operator
with its Helm chart as users do (the operator runs from the operator image in a pod), trains
in the trainer image, serves from the vLLM image, and prints `export INFERENCE_URL=...` for
the InferenceService's Service, reachable from this machine while the demo runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .cluster import REPO_ROOT, Cluster, stop_from_pid_file

DEMO_DIR = REPO_ROOT / ".demo"
NAMESPACE = "demo"
OPERATOR_NAMESPACE = "finetune-system"
RELEASE = "finetune-operator"
JOB = "quickstart"
CLAIM = "quickstart-workspace"
VLLM_PORT = 8000
OPENAI_API_PORT = 8090
# The jobs the fine-tuning API creates in the demo: short LoRA training and serving on the
# local node, like examples/quickstart.yaml (openaiApi.jobTemplate in the chart).
_LOCAL = {"nodeSelector": {"finetune.dev/local-node": "true"},
          "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists", "effect": "NoSchedule"}]}
OPENAI_JOB_TEMPLATE = {
    "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]}},
    "dataset": {"evalFraction": 0.1, "minExamples": 10},
    "training": {"epochs": 3, "perDeviceBatchSize": 8, "learningRate": 3.0e-3, "warmupSteps": 5,
                 "maxSeqLength": 256, "precision": "fp32", "loggingSteps": 2, "saveSteps": 20, "evalSteps": 20},
    "resources": {"gpusPerNode": 0, **_LOCAL},
    "storage": {"size": "1Gi"},
    "deploy": {"gpus": 0, **_LOCAL, "vllm": {"maxModelLen": 512, "maxLoraRank": 8, "dtype": "float32"}},
}
QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
DATASET = REPO_ROOT / "examples" / "data" / "quickstart.jsonl"
IMAGES = ("operator", "trainer", "vllm")  # `make images` names the real node runs


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


class Demo:
    def __init__(self, state_dir: Path = DEMO_DIR, *, timeout: float = 1200, metrics_port: int = 8080,
                 liveness_port: int = 8081, openai_api_port: int = OPENAI_API_PORT) -> None:
        self.state_dir = state_dir
        self.cluster = Cluster(state_dir / "cluster", images=IMAGES)
        self.real_node = self.cluster.node == "kubelet"
        self.timeout = timeout
        self.metrics_port, self.liveness_port = metrics_port, liveness_port
        self.openai_api_port = openai_api_port
        self.operator: subprocess.Popen | None = None
        self.model_dir: Path | None = None

    # steps -------------------------------------------------------------------------------
    def up(self) -> dict:
        t0 = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        say("building (or reusing) the control-plane binaries")
        tb = time.monotonic()
        from .cluster import control_plane_binaries

        self.cluster.bin_dir = control_plane_binaries()
        build_s = time.monotonic() - tb
        say(f"starting the local control plane (binaries ready in {build_s:.0f}s)")
        self.cluster.start()
        self.install_operator()
        model_dir = self.model_dir = self.prepare_model()
        self.prepare_workspace(model_dir)
        say(f"applying {QUICKSTART.relative_to(REPO_ROOT)}")
        self.kubectl("apply", "-f", str(QUICKSTART))
        self.watch_training()
        comparison = self.print_comparison()
        url = self.wait_serving()
        answers = self.ask(url)
        self.print_endings(url)
        total = time.monotonic() - t0
        say(f"demo finished in {total:.0f}s (of which {build_s:.0f}s building binaries)")
        return {"answers": answers, "comparison": comparison, "seconds": total, "build_seconds": build_s}

    def kube_version(self) -> str:
        return json.loads(self.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]

    def kubectl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.cluster.kubectl(*args, **kw)

    def install_operator(self) -> None:
        if self.real_node:
            return self.install_operator_chart()
        say("installing the CRDs and the chart's ServiceAccount + RBAC")
        self.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
        self.cluster.wait_established()
        self.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
        rendered = subprocess.run(
            [str(self.cluster.bin_dir / "helm"), "template", RELEASE, str(REPO_ROOT / "charts" / "finetune-operator"),
             "--namespace", OPERATOR_NAMESPACE, "--skip-crds", "--kube-version", self.kube_version()],
            check=True, capture_output=True, text=True).stdout
        # Everything but the operator's own Deployment: the demo runs the operator as a local
        # process with the chart's ServiceAccount token instead.
        docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] != "Deployment"]
        # ...with the chart's leader-election arguments, so that the chart's Lease RBAC is what
        # the demo's operator runs with (one replica here: it leads at once).
        deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
        leader_args = [a for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
                       if a.startswith("--leader-elect")]
        self.kubectl("apply", "-n", OPERATOR_NAMESPACE, "-f", "-",
                     input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        sa = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
        token = self.kubectl("create", "token", sa, "-n", OPERATOR_NAMESPACE, "--duration=24h").stdout.strip()
        kubeconfig = self.state_dir / "operator.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "operator",
            "clusters": [{"name": "local", "cluster": {"server": self.cluster.server,
                                                       "certificate-authority": str(self.cluster.pki / "ca.crt")}}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{"name": "operator", "context": {"cluster": "local", "user": sa}}]}))
        kubeconfig.chmod(0o600)
        log = open(self.state_dir / "operator.log", "ab")
        self.operator = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator", "--metrics-port", str(self.metrics_port),
             "--liveness-port", str(self.liveness_port), *leader_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)})
        (self.state_dir / "operator.pid").write_text(str(self.operator.pid))
        say(f"operator running as ServiceAccount {OPERATOR_NAMESPACE}/{sa} (pid {self.operator.pid}, "
            f"log {self.state_dir / 'operator.log'})")

    def install_operator_chart(self) -> None:
        """The real node: `helm install`, as users do; the operator runs from its image."""
        refs = self.cluster.image_refs
        image = lambda name: dict(zip(("repository", "tag"), refs[name].rsplit(":", 1)))  # noqa: E731
        local = {"nodeSelector": {"finetune.dev/local-node": "true"},
                 "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists",
                                  "effect": "NoSchedule"}]}
        values = self.state_dir / "operator-values.yaml"
        values.write_text(yaml.safe_dump({
            "image": {**image("operator"), "pullPolicy": "Never"},
            "trainerImage": image("trainer"), "vllmImage": image("vllm"),
            "metrics": {"port": self.metrics_port}, "health": {"port": self.liveness_port}, **local}))
        say(f"helm install {RELEASE} charts/finetune-operator (operator image {refs['operator']})")
        subprocess.run([str(self.cluster.bin_dir / "helm"), "install", RELEASE,
                        str(REPO_ROOT / "charts" / "finetune-operator"), "--namespace", OPERATOR_NAMESPACE,
                        "--create-namespace", "-f", str(values), "--wait", "--timeout=300s"],
                       check=True, env=self.cluster.env())
        say(f"operator running in a pod on the real node (kubectl logs -n {OPERATOR_NAMESPACE} "
            f"deploy/{RELEASE})")

    def prepare_model(self) -> Path:
        from .tiny_model import build_tiny_model

        source = os.environ.get("DEMO_BASE_MODEL")
        if source:
            say(f"using the base model at {source} (DEMO_BASE_MODEL)")
            return Path(source)
        say("building the tiny Llama-architecture base model (no internet needed)")
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "finetune-operator"
        return build_tiny_model(cache / "tiny-model")

    def prepare_workspace(self, model_dir: Path) -> None:
        say(f"creating the claim {CLAIM} and copying the base model and dataset onto it")
        self.kubectl("create", "namespace", NAMESPACE, check=False)
        self.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}}}))
        self.kubectl("wait", "-n", NAMESPACE, "--for=jsonpath={.status.phase}=Bound", f"pvc/{CLAIM}",
                     "--timeout=60s")
        root = self.claim_path()
        shutil.copytree(model_dir, root / "models" / "tiny-llama", dirs_exist_ok=True)
        (root / "data").mkdir(exist_ok=True)
        shutil.copy(DATASET, root / "data" / DATASET.name)

    def claim_path(self) -> Path:
        pv = self.kubectl("get", "pvc", CLAIM, "-n", NAMESPACE, "-o", "jsonpath={.spec.volumeName}").stdout
        return Path(self.kubectl("get", "pv", pv, "-o", "jsonpath={.spec.hostPath.path}").stdout)

    def job(self) -> dict:
        return json.loads(self.kubectl("get", "ftj", JOB, "-n", NAMESPACE, "-o", "json").stdout)

    def watch_training(self) -> None:
        say("training (kubectl get ftj -n demo -w shows the same):")
        deadline = time.monotonic() + self.timeout
        last = None
        while time.monotonic() < deadline:
            st = self.job().get("status", {})
            phase, prog, met = st.get("phase", "Pending"), st.get("progress", {}), st.get("metrics", {})
            line = (f"  {phase:<11} step {prog.get('step', 0)}/{prog.get('totalSteps', '?')} "
                    f"({prog.get('percent', 0):.0f}%)  loss {met.get('trainLoss', float('nan')):.3f}  "
                    f"eta {prog.get('etaSeconds', '?')}s")
            if line != last:
                print(line, flush=True)
                last = line
            if phase in ("Deploying", "Succeeded"):
                return
            if phase == "Failed":
                cond = [c for c in st.get("conditions", []) if c.get("status") == "False" or c["type"] == "Failed"]
                raise SystemExit(f"the FineTuneJob failed: {json.dumps(cond, indent=1)}\n"
                                 f"see `kubectl describe ftj {JOB} -n {NAMESPACE}` and {self.state_dir}/operator.log")
            time.sleep(2)
        raise SystemExit("timed out waiting for training")

    def print_comparison(self) -> dict:
        """status.comparison as the table it is, and where the review page is."""
        from finetune_trainer.compare import render_table

        comparison = self.job().get("status", {}).get("comparison") or {}
        say("base vs fine-tuned, measured through one vLLM server (status.comparison; "
            f"kubectl describe ftj {JOB} -n {NAMESPACE}):")
        if comparison.get("rows"):
            print("\n".join("  " + line for line in render_table(comparison["rows"]).splitlines()), flush=True)
        else:
            print(f"  no table: {comparison.get('state', 'not measured')}: {comparison.get('message', '')}", flush=True)
        print(f"  review page: {self.report_url()}  (answers side by side, verdicts, approval)", flush=True)
        return comparison

    def operator_url(self) -> str:
        """The operator's HTTP server (metrics, review page): a local process, or on the real
        node the chart's metrics Service, whose ClusterIP kube-proxy routes from this machine."""
        if self.real_node:
            ip = self.kubectl("get", "service", f"{RELEASE}-metrics", "-n", OPERATOR_NAMESPACE, "-o",
                              "jsonpath={.spec.clusterIP}", check=False).stdout.strip()
            if ip:
                return f"http://{ip}:{self.metrics_port}"
        return f"http://127.0.0.1:{self.metrics_port}"

    def report_url(self) -> str:
        return f"{self.operator_url()}/jobs/{NAMESPACE}/{JOB}/report"

    def wait_serving(self) -> str:
        say("waiting for the InferenceService to become Ready (vLLM loads the model, ~1 min)")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            out = self.kubectl("get", "inferenceservice.finetune.dev", JOB, "-n", NAMESPACE, "-o", "json",
                               check=False)
            st = json.loads(out.stdout).get("status", {}) if out.returncode == 0 else {}
            if st.get("phase") == "Ready" and JOB in st.get("servedModels", []):
                if self.real_node:
                    # kube-proxy routes the Service's ClusterIP from this machine too.
                    ip = self.kubectl("get", "service", JOB, "-n", NAMESPACE, "-o",
                                      "jsonpath={.spec.clusterIP}").stdout.strip()
                    return f"http://{ip}:{VLLM_PORT}/v1"
                # The local node gives every pod the address 127.0.0.1.
                return f"http://127.0.0.1:{VLLM_PORT}/v1"
            if st.get("phase") in ("Failed", "Degraded"):
                raise SystemExit(f"the InferenceService is {st['phase']}: {json.dumps(st.get('conditions'), indent=1)}")
            time.sleep(2)
        raise SystemExit("timed out waiting for the InferenceService")

    def ask(self, url: str) -> list[dict]:
        from openai import OpenAI

        from finetune_api.prompts import CHAT_TEMPLATE, text_prompt

        client = OpenAI(base_url=url, api_key="not-needed")
        spec = yaml.safe_load(QUICKSTART.read_text())["spec"]
        # Asked as it was trained (status.dataset.promptFormat): the tiny model has a chat
        # template, so its instruction records went through it: /v1/chat/completions.
        fmt = (self.job().get("status", {}).get("dataset") or {}).get("promptFormat") or "alpaca"
        answers = []
        say(f"asking the base model and the fine-tuned adapter the held-out prompts (prompt format {fmt}):")
        for item in spec["evaluation"]["prompts"]:
            row = {"prompt": item["prompt"]}
            for who, model in (("base", "tiny-llama"), ("fine-tuned", JOB)):
                if fmt == CHAT_TEMPLATE:
                    out = client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": item["prompt"]}],
                        max_tokens=12, temperature=0)
                    row[who] = (out.choices[0].message.content or "").strip()
                else:
                    out = client.completions.create(model=model, prompt=text_prompt(fmt, item["prompt"]),
                                                    max_tokens=12, temperature=0)
                    row[who] = out.choices[0].text.strip()
            answers.append(row)
            print(f"  prompt:      {row['prompt']}\n  base:        {row['base']!r}\n"
                  f"  fine-tuned:  {row['fine-tuned']!r}\n", flush=True)
        return answers

    def print_endings(self, url: str) -> None:
        say("where to look next")
        print(f"  export INFERENCE_URL={url}\n"
              f"  export KUBECONFIG={self.cluster.kubeconfig}\n"
              f"  kubectl get ftj,ftisvc -n {NAMESPACE}; kubectl describe ftj {JOB} -n {NAMESPACE}\n"
              f"  metrics: operator {self.operator_url()}/metrics, vLLM {url.removesuffix('/v1')}/metrics,\n"
              f"           trainer http://{'<trainer pod IP>' if self.real_node else '127.0.0.1'}:9400/metrics "
              f"while it trains\n"
              f"{self.artifact_lines()}"
              f"  MLflow tracking server: {self.cluster.mlflow_url} (set -a; . {self.cluster.mlflow_env_file}; set +a)\n"
              f"  S3-compatible store (MinIO): {self.cluster.s3_url} (set -a; . {self.cluster.s3_env_file}; set +a)\n"
              f"  clean up: make demo-down", flush=True)

    def artifact_lines(self) -> str:
        """The model card and its loss curve on the job's claim (a host folder here)."""
        try:
            from finetune_api.layout import ARTIFACTS, job_folder

            # The quickstart trains on a claim of its own naming (storage.existingClaim): its
            # outputs are in the job's folder there.
            artifacts = self.claim_path() / job_folder(JOB, shared_claim=True) / ARTIFACTS
        except Exception:  # noqa: BLE001 - the endings are a courtesy; never fail the demo on them
            return ""
        lines = f"  model card: {artifacts / 'README.md'}\n"
        if (artifacts / "loss.png").exists():
            lines += f"  loss curve: {artifacts / 'loss.png'} (train and eval loss, learning rate)\n"
        if (artifacts / "report.html").exists():
            lines += (f"  review page: {self.report_url()} (served by the operator), "
                      f"{artifacts / 'report.html'} (on the claim)\n")
        return lines

    def start_openai_api(self) -> dict:
        """Serve OpenAI's fine-tuning API for the namespace `demo`; return the `export` values."""
        from .openai_local import BASE_MODEL, LocalOpenAIApi

        # On the local node every pod has this machine's network, so one vLLM at a time can
        # listen on port 8000: the quickstart server is scaled to zero, and the API's jobs are
        # served by the InferenceService ft-tiny-llama. On the real node each pod has its own
        # IP: the quickstart server (INFERENCE_URL) keeps serving.
        if not self.real_node:
            say("scaling the quickstart InferenceService to zero: the fine-tuning API's jobs use port 8000 next")
            self.kubectl("patch", "inferenceservice.finetune.dev", JOB, "-n", NAMESPACE, "--type=merge",
                         "-p", json.dumps({"spec": {"replicas": 0}}))
            self.kubectl("wait", "-n", NAMESPACE, "--for=delete", "pod", "-l",
                         f"finetune.dev/inferenceservice={JOB}", "--timeout=120s", check=False)
        say(f"starting OpenAI's fine-tuning API on port {self.openai_api_port} (log {self.state_dir / 'openai-api.log'})")
        api = LocalOpenAIApi(self.cluster, self.state_dir, namespace=NAMESPACE, release=RELEASE,
                             release_namespace=OPERATOR_NAMESPACE, port=self.openai_api_port,
                             job_template=OPENAI_JOB_TEMPLATE)
        api.start(self.model_dir or self.prepare_model())
        exports = {"OPENAI_BASE_URL": api.url, "OPENAI_API_KEY": api.create_key(), "FINETUNE_BASE_MODEL": BASE_MODEL}
        say("OpenAI's fine-tuning quick-start runs against it with (docs/openai-migration.md):")
        for name, value in exports.items():
            print(f"export {name}={value}", flush=True)
        return exports

    def stop(self) -> None:
        down(self.state_dir, remove=False)


def down(state_dir: Path = DEMO_DIR, *, remove: bool = True) -> None:
    from .openai_local import stop_from_pid_file as stop_openai_api

    stop_openai_api(state_dir)
    pid_file = state_dir / "operator.pid"
    if pid_file.exists():
        from .cluster import _kill_group

        _kill_group(int(pid_file.read_text()))
        pid_file.unlink()
    stopped = stop_from_pid_file(state_dir / "cluster")
    if remove:
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"stopped: {', '.join(['operator'] + stopped) if stopped else 'nothing was running'}"
          + (f"; removed {state_dir}" if remove else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="finetune_devcluster.demo")
    p.add_argument("command", choices=["up", "down"])
    args = p.parse_args(argv)
    if args.command == "down":
        down()
        return 0
    down()  # a previous run's leftovers never collide with this one
    demo = Demo()
    demo.up()
    demo.start_openai_api()
    return 0


if __name__ == "__main__":
    sys.exit(main())
