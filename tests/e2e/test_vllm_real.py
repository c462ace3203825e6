"""The vLLM command the operator renders really serves the base model and a LoRA adapter.

The Deployment's command (from `build_deployment`) runs as a subprocess of this machine's
vLLM CPU build; only what differs between a pod and this machine is replaced: the volume
mount prefix by a local folder laid out like a FineTuneJob's volume, the port by a free one,
the host by 127.0.0.1 and `python` by this interpreter. The adapter is a real PEFT LoRA
adapter of the tiny model (random weights, as no hub is reachable).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from finetune_operator.serving import adapters, checks, common, deployment
from tests.fixtures.cluster import get_json, wait_for
from tests.fixtures.inference import finetunejob, inferenceservice, parse
from tests.cluster.test_inference_cluster import apply, create_succeeded_job, serving_operator, wait_phase  # noqa: F401

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 420  # seconds; about 30-60 s on an idle 2-core machine


@pytest.fixture(scope="module")
def lora_adapter(tiny_model: Path, tmp_path_factory) -> Path:
    """A job volume with `artifacts/adapter`: LoRA r=8 on q_proj/v_proj, saved with PEFT."""
    workspace = tmp_path_factory.mktemp("workspace")
    adapter = workspace / "artifacts" / "adapter"
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import LoraConfig, get_peft_model\n"
        "torch.manual_seed(0)\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'],"
        " task_type='CAUSAL_LM', init_lora_weights=False))\n"
        "peft.save_pretrained(sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tiny_model), str(adapter)], check=True, timeout=300)
    return workspace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parsed(tiny_model: Path):
    return parse(
        inferenceservice("tiny", model={"source": str(tiny_model)},
                         adapters=[{"name": "tiny-lora", "fineTuneJobRef": {"name": "tiny-lora"}}],
                         resources={"gpus": 0, "memory": "4Gi"},
                         vllm={"maxModelLen": 256, "maxLoraRank": 8, "maxLoras": 1}),
        finetunejob("tiny-lora", source=str(tiny_model), r=8))


def rendered_deployment(tiny_model: Path) -> dict:
    isvc, jobs = parsed(tiny_model)
    assert checks.check(isvc, jobs) == []
    return deployment.build_deployment(isvc, jobs)


MOUNT = "/adapters/tiny-lora-workspace"


def localise(deployment: dict, workspace: Path, port: int, home: Path) -> tuple[list[str], dict[str, str]]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert MOUNT in mounts
    argv = list(container["command"])
    argv[0] = sys.executable
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e},
           "HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    return argv, env


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"vLLM not healthy after {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def vllm_server(tiny_model, lora_adapter, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm")
    port = free_port()
    argv, env = localise(rendered_deployment(tiny_model), lora_adapter, port, work / "home")
    log = work / "vllm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        took = wait_healthy(f"http://127.0.0.1:{port}/health", proc, log, STARTUP_TIMEOUT)
        print(f"vLLM healthy after {took:.0f}s")
        # What the operator does once the pod is ready (serving/adapters.py), with the mount
        # prefix replaced by the local folder.
        isvc, jobs = parsed(tiny_model)
        want = {n: adapters.Want(w.path.replace(MOUNT, str(lora_adapter)), w.version)
                for n, w in adapters.wanted(isvc, jobs).items()}
        replica = adapters.sync_replica("local", adapters.HTTPServer(f"http://127.0.0.1:{port}"), want, {})
        assert replica.error is None and replica.loaded == {"tiny-lora": "tiny-lora"}
        yield f"http://127.0.0.1:{port}", argv
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_adapter_passes_the_serving_checks(tiny_model, lora_adapter):
    adapter = lora_adapter / "artifacts" / "adapter"
    assert checks.check_adapter_dir(adapter, str(tiny_model), max_lora_rank=8) == []
    [too_high] = checks.check_adapter_dir(adapter, str(tiny_model), max_lora_rank=4)
    assert "rank 8 exceeds" in too_high


def test_rendered_command_serves_base_and_adapter_through_the_openai_api(vllm_server):
    from openai import OpenAI

    base_url, argv = vllm_server
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120, max_retries=0)

    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "tiny-lora"}
    assert models["tiny-lora"].model_extra.get("parent") == "tiny"

    for name in ("tiny-lora", "tiny"):
        completion = client.completions.create(model=name, prompt="Repeat the word red", max_tokens=8,
                                               temperature=0)
        assert completion.model == name
        assert completion.usage.completion_tokens > 0

    metrics = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    samples = {line.split("{")[0].split(" ")[0] for line in metrics.splitlines() if line.startswith("vllm:")}
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting"} <= samples
    prompt_tokens = [line for line in metrics.splitlines() if line.startswith("vllm:prompt_tokens_total")]
    assert prompt_tokens and float(prompt_tokens[0].rsplit(" ", 1)[1]) > 0


def test_modules_to_save_adapters_are_refused(lora_adapter, tiny_model, tmp_path):
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    config = json.loads((lora_adapter / "artifacts" / "adapter" / "adapter_config.json").read_text())
    config.update(modules_to_save=["lm_head"], r=32)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    problems = checks.check_adapter_dir(bad, str(tiny_model), max_lora_rank=16)
    assert any("modules_to_save" in p for p in problems) and any("rank 32" in p for p in problems)


@pytest.mark.cluster
def test_inferenceservice_on_the_local_node_really_serves_the_adapter(cluster, namespace, tiny_model, lora_adapter,
                                                                      request):
    """The whole path: a FineTuneJob's claim holds the adapter (copied there, standing in for
    training), the operator renders the Deployment, the local node runs its pod's vLLM command
    with the claim mounted at /adapters/<job>, and the readiness probe makes it Ready."""
    import shutil

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", common.PORT)) == 0:
            pytest.skip("port 8000 is taken on this machine; the local node's pods share its network")
    request.getfixturevalue("serving_operator")  # after the port check: no operator for a skipped test
    create_succeeded_job(cluster, namespace, "tiny-lora", source=str(tiny_model), r=8)
    pvc = wait_for(lambda: (p := get_json(cluster, "pvc", "tiny-lora-workspace", "-n", namespace))["spec"].get(
        "volumeName") and p, timeout=60, what="the job's claim to bind")
    volume = Path(get_json(cluster, "pv", pvc["spec"]["volumeName"])["spec"]["hostPath"]["path"])
    shutil.copytree(lora_adapter / "artifacts", volume / "artifacts")

    apply(cluster, {"apiVersion": "finetune.dev/v1alpha1", "kind": "InferenceService",
                    "metadata": {"name": "tiny", "namespace": namespace},
                    "spec": {"model": {"source": str(tiny_model)},
                             "adapters": [{"name": "tiny-lora", "fineTuneJobRef": {"name": "tiny-lora"}}],
                             "resources": {"gpus": 0, "memory": "4Gi",
                                           "nodeSelector": {"finetune.dev/local-node": "true"},
                                           "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists"}]},
                             "vllm": {"maxModelLen": 256, "maxLoraRank": 8, "maxLoras": 1}}})
    status = wait_phase(cluster, namespace, "tiny", "Ready", timeout=STARTUP_TIMEOUT + 60)
    assert status["readyReplicas"] == 1 and status["servedModels"] == ["tiny", "tiny-lora"]

    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{common.PORT}/v1", api_key="unused", timeout=120, max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert models["tiny-lora"].model_extra.get("parent") == "tiny"
    assert client.completions.create(model="tiny-lora", prompt="Repeat", max_tokens=4).usage.completion_tokens > 0
