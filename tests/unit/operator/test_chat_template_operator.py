"""dataset.chatTemplate in the operator (issue 16): the trainer gets the template file (its
claim mounted), and vLLM serves an adapter with the chat template it was trained with: a job
that chose a template other than the base model's own gets `--chat-template` pointing at its
artifacts/chat_template.jinja (written by the trainer)."""

from __future__ import annotations

from finetune_operator.serving import deployment
from tests.fixtures.inference import finetunejob, inferenceservice, parse


def command(*jobs, **isvc_spec):
    adapters = [{"name": j["metadata"]["name"], "fineTuneJobRef": {"name": j["metadata"]["name"]}}
                for j in jobs]
    isvc, parsed = parse(inferenceservice(adapters=adapters, **isvc_spec), *jobs)
    return deployment.vllm_command(isvc, parsed)


def test_a_named_template_is_served_from_the_jobs_artifacts():
    job = finetunejob("support", dataset={"source": "pvc://data/chat.jsonl", "format": "chat",
                                          "chatTemplate": {"name": "llama-3.1"}})

    cmd = command(job)

    assert cmd[cmd.index("--chat-template") + 1] == "/adapters/support-workspace/artifacts/chat_template.jinja"


def test_a_template_file_is_served_from_a_shared_claim_under_the_jobs_folder():
    job = finetunejob("legal", existing_claim="legal-data",
                      dataset={"source": "pvc://data/chat.jsonl", "format": "chat",
                               "chatTemplate": {"file": "pvc://legal-data/templates/t.jinja"}})

    cmd = command(job)

    assert cmd[cmd.index("--chat-template") + 1] == "/adapters/legal-data/jobs/legal/artifacts/chat_template.jinja"


def test_the_models_own_template_needs_no_flag():
    job = finetunejob("plain", dataset={"source": "pvc://data/chat.jsonl", "format": "chat"})

    assert "--chat-template" not in command(job)


def test_a_template_file_on_another_claim_is_mounted_and_given_to_the_trainer():
    from finetune_api.models import FineTuneJob
    from finetune_operator.builders.trainer_config import build_trainer_config, other_claims

    job = FineTuneJob.from_resource(finetunejob(
        "support", dataset={"source": "pvc://data/chat.jsonl", "format": "chat",
                            "chatTemplate": {"file": "pvc://templates/llama/t.jinja", "lossOn": "all"}}))

    config = build_trainer_config(job)

    assert config["dataset"]["chatTemplate"] == {"name": "model", "file": "/mnt/claims/templates/llama/t.jinja",
                                                 "lossOn": "all"}
    assert "templates" in [mount.claim for mount in other_claims(job)]
