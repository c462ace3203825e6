"""No user string reaches a shell.

Shell metacharacters go into every string field of a FineTuneJob and an InferenceService
that is free text. The pure builders (finetune_operator.builders.trainer_job, .trainer_config
and .inference) must render commands as argument lists, never `sh -c`/`bash -c`, carry the
strings literally (as whole list elements, or JSON values in the trainer's ConfigMap), and
escape `$` so the kubelet's $(VAR) expansion cannot turn a user string into a Secret's value.
The schema's refusals of the same characters elsewhere are in test_security_bad_input.py.
"""

from __future__ import annotations

import json

import pytest

from finetune_api.models import FineTuneJob, InferenceService
from finetune_operator.builders import trainer_config, trainer_job
from finetune_operator.serving import deployment
from tests.fixtures.inference import finetunejob, inferenceservice

pytestmark = [pytest.mark.reliability]

HOSTILE = ["$(touch /tmp/pwned)", "; rm -rf /", "`id`", "a\nb; reboot", "' \" | && > /etc/passwd", "$(HF_TOKEN)",
           "日本語 🙂 \u202e"]
SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "dash", "zsh", "/usr/bin/env"}


def containers(obj: dict) -> list[dict]:
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def assert_no_shell(obj: dict) -> None:
    for c in containers(obj):
        argv = list(c.get("command") or []) + list(c.get("args") or [])
        assert argv and all(isinstance(a, str) for a in argv), c
        assert argv[0] not in SHELLS and "-c" not in argv[:3], f"{c['name']} runs through a shell: {argv[:4]}"


def hostile_job(value: str, **resources) -> FineTuneJob:
    body = finetunejob("tune", phase=None, uid="uid-1",
                       dataset={"source": "pvc://data/train.jsonl", "fieldMap": {"instruction": value, "output": value}},
                       evaluation={"prompts": [{"prompt": value, "reference": value}]},
                       resources={"gpusPerNode": 1, "nodeSelector": {"pool": value}, **resources})
    return FineTuneJob.from_resource(body)


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("nodes", [1, 2])
def test_trainer_job_runs_a_fixed_argument_list_and_carries_user_strings_as_json(value, nodes):
    """Single- and multi-node trainer Jobs: the command holds no user string at all; the hostile
    value reaches the trainer only as JSON data in its config, unchanged."""
    job = hostile_job(value, nodes=nodes)

    rendered = trainer_job.build_trainer_job(job, "finetune-trainer:test")
    config = json.loads(trainer_config.render_config(job))

    assert_no_shell(rendered)
    argv = containers(rendered)[0]["command"]
    assert not any(value in a for a in argv)
    if nodes == 1:
        assert argv[-5:] == ["-m", "finetune_trainer", "train", "--config", trainer_config.CONFIG_PATH]
    else:  # the launcher: generated names and numbers only
        assert argv[1:6] == ["-m", "finetune_trainer", "launch", "--config", trainer_config.CONFIG_PATH]
    assert config["dataset"]["fieldMap"] == {"instruction": value, "output": value}
    assert config["evaluation"]["prompts"] == [{"prompt": value, "reference": value}]


@pytest.mark.parametrize("value", HOSTILE)
def test_vllm_command_carries_extra_args_as_whole_escaped_elements(value):
    """extraArgs values become whole list elements of the vLLM command, in order, with `$` doubled
    (the kubelet turns `$$` back into `$`, so the process sees the user's exact string)."""
    isvc = InferenceService.from_resource(inferenceservice(
        model={"source": "hf://Qwen/Qwen2.5-0.5B-Instruct", "tokenSecretRef": {"name": "hf", "key": "token"}},
        adapters=[{"name": "faq-v1", "path": "pvc://adapters/faq-v1"}],
        vllm={"extraArgs": [f"--served-note={value}", value]}))

    rendered = deployment.build_deployment(isvc, {})

    assert_no_shell(rendered)
    argv = containers(rendered)[0]["command"]
    escaped = value.replace("$", "$$")
    assert argv[-2:] == [f"--served-note={escaped}", escaped]
    assert kubelet_expand(argv[-1], {"HF_TOKEN": "hf_SECRET"}) == value


def kubelet_expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args (third_party/forked/golang/expansion)."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2:end]
                    out.append(env.get(name, value[i:end + 1]))
                    i = end + 1
                    continue
        out.append(value[i])
        i += 1
    return "".join(out)


def test_every_rendered_container_is_an_argument_list_without_a_shell():
    """Across the builders' shapes (single/multi-node/multi-GPU trainer, base and merged vLLM) no
    container runs `sh -c` or `bash -c`."""
    for resources in ({"gpusPerNode": 0}, {"gpusPerNode": 4}, {"gpusPerNode": 2, "nodes": 3}):
        job = FineTuneJob.from_resource(finetunejob("t", phase=None, uid="u", resources=resources))
        assert_no_shell(trainer_job.build_trainer_job(job, "img"))
    merged = FineTuneJob.from_resource(finetunejob("chat-full", method="full", uid="u2"))
    for isvc in (inferenceservice(),
                 inferenceservice(model={"source": "hf://org/base"}, mergedModel={"fineTuneJobRef": {"name": "chat-full"}})):
        assert_no_shell(deployment.build_deployment(InferenceService.from_resource(isvc), {"chat-full": merged}))
