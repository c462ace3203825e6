"""Adapters loaded into a running vLLM server: the real control plane, the serving operator as
a process, and vLLM's CPU build really running in the InferenceService's pod on the local node.

Training is stood in for by writing a real PEFT LoRA adapter of the tiny model into the
job's folder on a shared claim (`storage.existingClaim`) and marking the FineTuneJob
Succeeded; everything after that is real. Single replica: the local node's pods use the
host network, so a second vLLM replica would collide on port 8000 (the multi-replica
convergence is in tests/unit/operator/test_runtime_adapters.py).

Run under the shared vLLM lock: `flock /work/wt/vllm.lock .venv/bin/python -m pytest ...`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_operator.serving import common
from finetune_operator.serving import handlers as handler
from tests.cluster.test_inference_cluster import apply, create_succeeded_job, serving_operator  # noqa: F401
from tests.e2e.test_vllm_real import STARTUP_TIMEOUT, lora_adapter  # noqa: F401
from tests.fixtures.cluster import get_json, wait_for

pytestmark = pytest.mark.slow

CLAIM = "team-adapters"
LOCAL = {"nodeSelector": {"finetune.dev/local-node": "true"},
         "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists"}]}


def shared_claim(cluster, namespace: str, request) -> Path:
    """Start the serving operator (unless port 8000 is taken) and create the claim the jobs
    share; returns the folder that backs it on this machine."""
    def port_free() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", common.PORT)) != 0

    try:  # the previous test's server may still be stopping (its namespace goes asynchronously)
        wait_for(port_free, timeout=120, what="port 8000 to be free", interval=1)
    except AssertionError:
        pytest.skip("port 8000 is taken on this machine; the local node's pods share its network")
    request.getfixturevalue("serving_operator")
    apply(cluster, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": CLAIM, "namespace": namespace},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    pvc = wait_for(lambda: (p := get_json(cluster, "pvc", CLAIM, "-n", namespace))["spec"].get("volumeName") and p,
                   timeout=60, what="the shared claim to bind")
    return Path(get_json(cluster, "pv", pvc["spec"]["volumeName"])["spec"]["hostPath"]["path"])


def _serving_pod(cluster, namespace: str) -> dict:
    pods = get_json(cluster, "pods", "-n", namespace, "-l", "finetune.dev/inferenceservice=tiny")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 1, [p["metadata"]["name"] for p in pods]
    return live[0]


def _isvc(cluster, namespace: str) -> dict:
    return get_json(cluster, "inferenceservice", "tiny", "-n", namespace)


def _ready_serving(cluster, namespace: str, names: set[str], absent: set[str] = frozenset()):
    obj = _isvc(cluster, namespace)
    st = obj.get("status") or {}
    served = set(st.get("servedModels") or [])
    return (st.get("observedGeneration") == obj["metadata"]["generation"] and st.get("phase") == "Ready"
            and names <= served and not (absent & served) and st)


def test_a_second_job_deploys_into_the_running_server_without_restarting_it(
        cluster, namespace, tiny_model, lora_adapter, request):  # noqa: F811
    volume = shared_claim(cluster, namespace, request)
    from openai import OpenAI

    deploy = {"inferenceService": "tiny", "gpus": 0, **LOCAL}
    create_succeeded_job(cluster, namespace, "first", source=str(tiny_model), r=8, existing_claim=CLAIM,
                         deploy=deploy)
    for job in ("first", "second"):  # what training would leave in each job's folder
        shutil.copytree(lora_adapter / "artifacts", volume / "jobs" / job / "artifacts")

    apply(cluster, {"apiVersion": "finetune.dev/v1alpha1", "kind": "InferenceService",
                    "metadata": {"name": "tiny", "namespace": namespace},
                    "spec": {"model": {"source": str(tiny_model)},
                             "adapters": [{"name": "first", "fineTuneJobRef": {"name": "first"}}],
                             "resources": {"gpus": 0, "memory": "4Gi", **LOCAL},
                             "vllm": {"maxModelLen": 256, "maxLoraRank": 8, "maxLoras": 2}}})
    started = time.monotonic()
    status = wait_for(lambda: _ready_serving(cluster, namespace, {"tiny", "first"}),
                      timeout=STARTUP_TIMEOUT + 60, what="the server Ready with the first adapter")
    print(f"first adapter served {time.monotonic() - started:.1f} s after the InferenceService was created")
    before = _serving_pod(cluster, namespace)
    deployment_generation = get_json(cluster, "deployment", "tiny", "-n", namespace)["metadata"]["generation"]
    assert status["replicaAdapters"] == [{"pod": before["metadata"]["name"],
                                          "adapters": [{"name": "first", "version": _uid(cluster, namespace, "first")}]}]
    client = OpenAI(base_url=f"http://127.0.0.1:{common.PORT}/v1", api_key="unused", timeout=120, max_retries=0)

    # The second job finishes training: the FineTuneJob handler adds it to the server.
    create_succeeded_job(cluster, namespace, "second", source=str(tiny_model), r=8, existing_claim=CLAIM,
                         deploy=deploy)
    record_renderings(cluster, namespace, "second", tiny_model)
    succeeded = time.monotonic()
    handler.ensure_for_finetunejob(get_json(cluster, "finetunejob", "second", "-n", namespace),
                                   cluster.api_client())
    wait_for(lambda: _ready_serving(cluster, namespace, {"tiny", "first", "second"}), timeout=60,
             what="the second adapter served")
    completion = client.completions.create(model="second", prompt="Repeat the word red", max_tokens=4,
                                           temperature=0)
    # The train/serve prompt check passed: vLLM renders the chat as training did.
    check = _condition(_isvc(cluster, namespace), "PromptFormatMismatch")
    assert check["status"] == "False" and check["reason"] == "SameAsTraining", check
    assert "second: 2 example(s)" in check["message"]
    print(f"second adapter answered {time.monotonic() - succeeded:.1f} s after its job succeeded")
    assert completion.model == "second" and completion.usage.completion_tokens > 0
    models = {m.id: m.model_extra.get("parent") for m in client.models.list().data}
    assert models == {"tiny": None, "first": "tiny", "second": "tiny"}

    after = _serving_pod(cluster, namespace)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert [c["restartCount"] for c in after["status"]["containerStatuses"]] == [0]
    assert get_json(cluster, "deployment", "tiny", "-n", namespace)["metadata"]["generation"] == deployment_generation

    # Taking the first job away unloads it, still without a restart.
    handler.withdraw_finetunejob(_job(cluster, namespace, "first"), cluster.api_client())
    wait_for(lambda: _ready_serving(cluster, namespace, {"tiny", "second"}, absent={"first"}), timeout=60,
             what="the first adapter unloaded")
    assert {m.id for m in client.models.list().data} == {"tiny", "second"}
    after = _serving_pod(cluster, namespace)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert [c["restartCount"] for c in after["status"]["containerStatuses"]] == [0]


@pytest.fixture(scope="module")
def adapter_versions(tiny_model: Path, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT adapters of the tiny model: `good` leaves the model as it is (LoRA's B starts
    at zero), `bad` has large random weights, which makes every answer less likely."""
    out = tmp_path_factory.mktemp("versions")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from peft import LoraConfig, get_peft_model\n"
        "torch.manual_seed(0)\n"
        "for name, noisy in (('good', False), ('bad', True)):\n"
        "    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'],"
        " task_type='CAUSAL_LM', init_lora_weights=not noisy))\n"
        "    if noisy:\n"
        "        with torch.no_grad():\n"
        "            for n, p in peft.named_parameters():\n"
        "                if 'lora_B' in n:\n"
        "                    p.normal_(0, 2.0)\n"
        "    peft.save_pretrained(f'{sys.argv[2]}/{name}')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tiny_model), str(out)], check=True, timeout=300)
    return {"good": out / "good", "bad": out / "bad"}


EVAL_PROMPTS = [{"prompt": "Name a colour.", "reference": "Red is a colour."},
                {"prompt": "Say hello.", "reference": "Hello there, friend."},
                {"prompt": "Count to three.", "reference": "One, two, three."}]


def test_a_worse_version_is_refused_and_the_current_one_keeps_answering(
        cluster, namespace, tiny_model, adapter_versions, request):
    """spec.adapters[].promotion: the new version (a FineTuneJob with large random LoRA
    weights) is loaded as bot-candidate, scored against the serving one through vLLM on the
    new job's evaluation prompts, refused, and unloaded; `bot` answers from v1 throughout."""
    volume = shared_claim(cluster, namespace, request)
    from openai import OpenAI

    for job, version in (("v1", "good"), ("v2", "bad")):
        create_succeeded_job(cluster, namespace, job, source=str(tiny_model), r=8, existing_claim=CLAIM,
                             evaluation={"prompts": EVAL_PROMPTS})
        shutil.copytree(adapter_versions[version], volume / "jobs" / job / "artifacts" / "adapter")
    body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "tiny", "namespace": namespace},
            "spec": {"model": {"source": str(tiny_model)},
                     "adapters": [{"name": "bot", "fineTuneJobRef": {"name": "v1"}, "promotion": {"margin": 0.0}}],
                     "resources": {"gpus": 0, "memory": "4Gi", **LOCAL},
                     "vllm": {"maxModelLen": 256, "maxLoraRank": 8, "maxLoras": 2}}}
    apply(cluster, body)
    status = wait_for(lambda: _ready_serving(cluster, namespace, {"tiny", "bot"}),
                      timeout=STARTUP_TIMEOUT + 60, what="the server Ready with v1 as bot")
    assert status["promotions"] == [{"name": "bot", "fineTuneJob": "v1", "version": _uid(cluster, namespace, "v1")}]
    before = _serving_pod(cluster, namespace)
    client = OpenAI(base_url=f"http://127.0.0.1:{common.PORT}/v1", api_key="unused", timeout=120, max_retries=0)

    body["spec"]["adapters"][0]["fineTuneJobRef"]["name"] = "v2"
    apply(cluster, body)
    answered = 0

    def refused():
        nonlocal answered
        # The current version keeps answering while the candidate is scored.
        assert client.completions.create(model="bot", prompt="Say hello.", max_tokens=2).usage.completion_tokens
        answered += 1
        obj = _isvc(cluster, namespace)
        st = obj.get("status") or {}
        promoted = next((c for c in st.get("conditions") or [] if c["type"] == "Promoted"), {})
        return (st.get("observedGeneration") == obj["metadata"]["generation"]
                and promoted.get("reason") == "CandidateRefused" and st)

    status = wait_for(refused, timeout=120, what="the candidate to be refused")
    [record] = status["promotions"]
    assert record["fineTuneJob"] == "v1" and record["candidate"] == "v2" and record["result"] == "Refused"
    assert record["candidateEvalLoss"] > record["currentEvalLoss"] > 0
    message = next(c for c in status["conditions"] if c["type"] == "Promoted")["message"]
    assert f"{record['candidateEvalLoss']:.4f} for v2 against {record['currentEvalLoss']:.4f} for v1" in message
    assert status["phase"] == "Ready" and answered >= 1
    models = {m.id: m.model_extra.get("root") for m in client.models.list().data}
    assert set(models) == {"tiny", "bot"} and models["bot"].endswith("/jobs/v1/artifacts/adapter")
    assert client.completions.create(model="bot", prompt="Say hello.", max_tokens=2).usage.completion_tokens
    after = _serving_pod(cluster, namespace)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert [c["restartCount"] for c in after["status"]["containerStatuses"]] == [0]


CHATS = [{"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]},
         {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                       {"role": "assistant", "content": "Red."}]}]


def record_renderings(cluster, namespace: str, job: str, tiny_model: Path) -> list[dict]:
    """What the trainer reports after training chat data (finetune_trainer.renderings, with
    the model's own tokenizer and chat template)."""
    from transformers import AutoTokenizer

    from finetune_trainer.renderings import prompt_renderings

    renderings = prompt_renderings(AutoTokenizer.from_pretrained(str(tiny_model)), CHATS)
    assert len(renderings) == 2 and renderings[0]["text"].startswith("<|im_start|>user")
    cluster.kubectl("patch", "finetunejob", job, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"artifacts": {"adapter": "/workspace/artifacts/adapter",
                                                               "promptRenderings": renderings}}}))
    return renderings


WRONG_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }} {% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")


def test_a_server_with_another_chat_template_is_reported(cluster, namespace, tiny_model, lora_adapter,
                                                         request):  # noqa: F811
    """vLLM is started with a chat template other than the one training used
    (spec.vllm.extraArgs --chat-template): PromptFormatMismatch names the first differing
    token and both renderings, and the server is not Ready."""
    volume = shared_claim(cluster, namespace, request)
    create_succeeded_job(cluster, namespace, "chatty", source=str(tiny_model), r=8, existing_claim=CLAIM)
    trained = record_renderings(cluster, namespace, "chatty", tiny_model)
    shutil.copytree(lora_adapter / "artifacts", volume / "jobs" / "chatty" / "artifacts")
    apply(cluster, {"apiVersion": "finetune.dev/v1alpha1", "kind": "InferenceService",
                    "metadata": {"name": "tiny", "namespace": namespace},
                    "spec": {"model": {"source": str(tiny_model)},
                             "adapters": [{"name": "chatty", "fineTuneJobRef": {"name": "chatty"}}],
                             "resources": {"gpus": 0, "memory": "4Gi", **LOCAL},
                             "vllm": {"maxModelLen": 256, "maxLoraRank": 8, "maxLoras": 1,
                                      "extraArgs": ["--chat-template", WRONG_TEMPLATE]}}})

    def reported():
        obj = _isvc(cluster, namespace)
        st = obj.get("status") or {}
        return (st.get("observedGeneration") == obj["metadata"]["generation"]
                and _condition(obj, "PromptFormatMismatch").get("status") == "True" and st)

    status = wait_for(reported, timeout=STARTUP_TIMEOUT + 60, what="PromptFormatMismatch")
    message = _condition({"status": status}, "PromptFormatMismatch")["message"]
    assert message.startswith("chatty (FineTuneJob chatty) on pod "), message
    assert "example 0: the first difference is at token 0: training had " in message
    assert f"{trained[0]['tokenIds'][0]} '<|im_start|>'" in message
    assert "the server renders 'user: Say hello. assistant:'" in message
    assert "training rendered '<|im_start|>user" in message
    assert status["phase"] == "Degraded"
    ready = _condition({"status": status}, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "PromptFormatMismatch"
    assert "chatty" in status["servedModels"]  # it is served; the condition says how it differs


def _condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def _uid(cluster, namespace: str, name: str) -> str:
    return get_json(cluster, "finetunejob", name, "-n", namespace)["metadata"]["uid"]


def _job(cluster, namespace: str, name: str):
    from finetune_api.models import FineTuneJob

    return FineTuneJob.from_resource(get_json(cluster, "finetunejob", name, "-n", namespace))
