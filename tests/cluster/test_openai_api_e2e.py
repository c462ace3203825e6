"""OpenAI's fine-tuning quick-start, with the real `openai` client, against `finetune-operator api`.

Everything is real: the control plane with RBAC, the API process running with the chart's own
ServiceAccount and RBAC for it, TokenReview and SubjectAccessReview for ServiceAccount tokens,
API keys in Secrets, the operator, the trainer on the local node with the tiny model, and
vLLM's CPU build serving the adapter (port 8000 of this machine: not while `make demo` runs).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from finetune_devcluster.cluster import free_port
from finetune_devcluster.openai_local import BASE_MODEL, LocalOpenAIApi
from finetune_operator.builders.trainer_job import TERMINATION_GRACE_SECONDS
from tests.fixtures.cluster import get_json, wait_for
from tests.fixtures.ml import learnable_chat_records, write_jsonl

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LOCAL = {"nodeSelector": {"finetune.dev/local-node": "true"},
         "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists", "effect": "NoSchedule"}]}
# What the platform team puts in the chart's openaiApi.jobTemplate: short CPU training on
# the local node, and serving there.
JOB_TEMPLATE = {
    "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
    "dataset": {"evalFraction": 0.1, "minExamples": 4, "dedup": {"exact": False, "nearThreshold": 0}},
    "training": {"maxSteps": 12, "perDeviceBatchSize": 4, "learningRate": 3e-3, "lrScheduler": "constant",
                 "maxSeqLength": 64, "precision": "fp32", "loggingSteps": 2, "saveSteps": 6, "seed": 0,
                 "gradientCheckpointing": False},
    "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "4Gi", **LOCAL},
    "storage": {"size": "1Gi"},
    "deploy": {"gpus": 0, **LOCAL, "vllm": {"maxModelLen": 256, "maxLoraRank": 8, "dtype": "float32"}},
}


@pytest.fixture
def openai_api(cluster, crds, namespace, operator, tiny_model, tmp_path, request):
    api = LocalOpenAIApi(cluster, tmp_path / "api", namespace=namespace, release=f"oa-{namespace}",
                         release_namespace=f"{namespace}-api", port=free_port(), job_template=JOB_TEMPLATE,
                         extra_args=("--max-running-jobs", "1"))
    api.start(tiny_model)
    yield api
    print(f"--- the OpenAI API's log ---\n{api.tail(120)}")  # shown when the test failed
    api.stop()
    cluster.kubectl("delete", "namespace", api.release_namespace, "--wait=false", check=False)


def claim_folder(cluster, namespace: str, claim: str) -> Path:
    """The hostPath folder of the volume bound to a claim (the local node's volumes)."""
    pvc = get_json(cluster, "pvc", claim, "-n", namespace)
    return Path(get_json(cluster, "pv", pvc["spec"]["volumeName"])["spec"]["hostPath"]["path"])


def client_for(api: LocalOpenAIApi, key: str) -> OpenAI:
    return OpenAI(base_url=api.url, api_key=key, max_retries=0, timeout=120)


def follow(client: OpenAI, job_id: str, until, *, timeout: float, seen: set | None = None):
    def check():
        job = client.fine_tuning.jobs.retrieve(job_id)
        if seen is not None:
            seen.add(job.status)
        return (job.status == "failed" or until(job)) and job
    job = wait_for(check, timeout=timeout, what=f"fine-tuning job {job_id}", interval=1)
    assert job.status != "failed", f"the job failed: {job.error}"
    return job


def serviceaccount_token(cluster, namespace: str, *, may_use_finetunejobs: bool) -> str:
    name = f"caller-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "serviceaccount", name, "-n", namespace)
    if may_use_finetunejobs:
        cluster.kubectl("create", "role", name, "-n", namespace, "--verb=get,list,create,patch,delete",
                        "--resource=finetunejobs.finetune.dev")
        cluster.kubectl("create", "rolebinding", name, "-n", namespace, f"--role={name}",
                        f"--serviceaccount={namespace}:{name}")
    return cluster.kubectl("create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()


def test_quickstart_uploads_trains_lists_checkpoints_and_chats(cluster, namespace, openai_api, tmp_path):
    key = openai_api.create_key()
    client = client_for(openai_api, key)

    # Given a file with a broken third line, the upload is refused naming the line; nothing is stored.
    records = learnable_chat_records()
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([json.dumps(records[0]), json.dumps(records[1]), '{"messages": [{"role": "user"',
                                 json.dumps(records[2])]) + "\n")
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=broken.open("rb"), purpose="fine-tune")
    assert refused.value.status_code == 400 and "line 3" in refused.value.message
    assert refused.value.code == "invalid_file_format" and refused.value.param == "file"
    assert client.files.list().data == []

    # A wrong key is 401.
    with pytest.raises(openai.AuthenticationError) as wrong:
        client_for(openai_api, key[:-2] + "xx").fine_tuning.jobs.list()
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"

    # The quick-start: upload, create, follow, checkpoints, chat.
    data = write_jsonl(tmp_path / "pirate.jsonl", records)
    uploaded = client.files.create(file=data.open("rb"), purpose="fine-tune")
    assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("fine-tune", data.stat().st_size, "pirate.jsonl")
    assert client.files.content(uploaded.id).read() == data.read_bytes()

    create = dict(training_file=uploaded.id, model=BASE_MODEL, suffix="echo", seed=3, metadata={"case": "quickstart"},
                  extra_headers={"Idempotency-Key": "quickstart-1"})
    job = client.fine_tuning.jobs.create(**create)
    assert job.status in ("queued", "validating_files") and job.fine_tuned_model is None
    assert client.fine_tuning.jobs.create(**create).id == job.id, "a retried create finds its job"
    assert len(client.fine_tuning.jobs.list().data) == 1
    ftj = get_json(cluster, "ftj", job.id, "-n", namespace)
    assert ftj["spec"]["dataset"]["source"] == f"pvc://openai-files/files/{uploaded.id}.jsonl"
    assert ftj["spec"]["training"]["seed"] == 3

    seen: set[str] = set()
    estimates: list[int] = []
    done = follow(client, job.id, lambda j: (j.status == "running" and j.estimated_finish and
                                            estimates.append(j.estimated_finish)) or j.status == "succeeded",
                  timeout=900, seen=seen)
    assert "running" in seen
    assert done.fine_tuned_model == f"ft:{BASE_MODEL}:echo:{job.id}"
    assert done.finished_at and done.hyperparameters.n_epochs == 1 and done.hyperparameters.batch_size == 4
    assert done.estimated_finish is None and all(e >= job.created_at for e in estimates)
    # trained_tokens is the trainer's own count of the tokens it trained on (HF Trainer's
    # num_input_tokens_seen), the same number as the run's summary on the job volume.
    summary = json.loads((claim_folder(cluster, namespace, f"{job.id}-workspace") / "reports" / "summary.json").read_text())
    assert done.trained_tokens == summary["tokensSeen"] > 0

    # The result file: results.csv with one row per logged step, served as a file.
    assert len(done.result_files) == 1
    result = client.files.retrieve(done.result_files[0])
    assert (result.purpose, result.filename) == ("fine-tune-results", "step_metrics.csv")
    rows = client.files.content(done.result_files[0]).read().decode().splitlines()
    assert rows[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 4, 6, 8, 10, 12]  # the first step is logged too
    assert all(r.split(",")[1] for r in rows[1:]), "every logged step has its training loss"

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].created_at >= events[-1].created_at
    assert "The job has successfully completed" in [e.message for e in events]
    assert any(e.type == "metrics" and e.data["step"] == 12 for e in events)
    first_page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(first_page.data) == 2 and first_page.has_more

    # Every kept checkpoint (saveSteps 6), newest first, with the metrics logged last before it.
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 6]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-12"
    csv_loss = {int(r.split(",")[0]): float(r.split(",")[1]) for r in rows[1:]}
    assert [c.metrics.train_loss for c in checkpoints] == pytest.approx([csv_loss[12], csv_loss[6]], rel=1e-4)

    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"case": "quickstart"}).data] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"case": "other"}).data == []
    assert done.fine_tuned_model in [m.id for m in client.models.list().data]

    answer = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=6, temperature=0,
                                            messages=[{"role": "system", "content": "You answer briefly."},
                                                      {"role": "user", "content": "Repeat the word sun 2 times."}])
    assert answer.model == done.fine_tuned_model
    assert answer.usage.completion_tokens > 0 and answer.choices[0].message.role == "assistant"

    # Another namespace's ServiceAccount, allowed FineTuneJobs in its own namespace, sees nothing here.
    other_ns = f"{namespace}-other"
    cluster.kubectl("create", "namespace", other_ns)
    try:
        wait_for(lambda: cluster.kubectl("get", "sa", "default", "-n", other_ns, check=False).returncode == 0,
                 timeout=30, what="the other namespace's default ServiceAccount")
        other = client_for(openai_api, serviceaccount_token(cluster, other_ns, may_use_finetunejobs=True))
        assert other.fine_tuning.jobs.list().data == []
        with pytest.raises(openai.NotFoundError):
            other.fine_tuning.jobs.retrieve(job.id)
        with pytest.raises(openai.NotFoundError):
            other.fine_tuning.jobs.cancel(job.id)
        with pytest.raises(openai.NotFoundError):
            other.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(uploaded.id)
        # A token without rights on FineTuneJobs is refused (SubjectAccessReview).
        powerless = client_for(openai_api, serviceaccount_token(cluster, other_ns, may_use_finetunejobs=False))
        with pytest.raises(openai.PermissionDeniedError):
            powerless.fine_tuning.jobs.list()
    finally:
        cluster.kubectl("delete", "namespace", other_ns, "--wait=false", check=False)

    # Finished jobs cannot be cancelled; files in use by a finished job can be deleted.
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.files.delete(uploaded.id).deleted
    assert key not in openai_api.log.read_text()


def trainer_pods(cluster, namespace: str, name: str) -> list[dict]:
    return get_json(cluster, "pods", "-n", namespace, "-l", f"finetune.dev/finetunejob={name}")["items"]


def test_pause_and_resume_keep_checkpoints_and_cancel_stops_the_trainer(cluster, namespace, openai_api, tmp_path):
    # A namespace ServiceAccount's token works like a key (TokenReview + SubjectAccessReview).
    client = client_for(openai_api, serviceaccount_token(cluster, namespace, may_use_finetunejobs=True))
    data = write_jsonl(tmp_path / "long.jsonl", learnable_chat_records(96))
    uploaded = client.files.create(file=data.open("rb"), purpose="fine-tune")
    # n_epochs overrides the template's maxSteps: ~10 x 22 steps, long enough to pause midway.
    job = client.fine_tuning.jobs.create(training_file=uploaded.id, model=BASE_MODEL,
                                         method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10}}})
    assert get_json(cluster, "ftj", job.id, "-n", namespace)["spec"]["training"]["epochs"] == 10

    # The namespace may run one job at a time here (--max-running-jobs 1).
    with pytest.raises(openai.RateLimitError) as limited:
        client.fine_tuning.jobs.create(training_file=uploaded.id, model=BASE_MODEL)
    assert limited.value.status_code == 429

    follow(client, job.id, lambda j: client.fine_tuning.jobs.checkpoints.list(j.id).data, timeout=600)
    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    # The trainer checkpoints on SIGTERM and exits; it must not be left to run on (or to
    # finish the job) until the SIGKILL at the end of its grace period.
    wait_for(lambda: not trainer_pods(cluster, namespace, job.id), timeout=TERMINATION_GRACE_SECONDS - 20,
             what="the trainer to checkpoint and exit on SIGTERM, before its grace period ends")
    assert get_json(cluster, "ftj", job.id, "-n", namespace)["status"]["phase"] == "Suspended"
    kept = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert kept, "pausing keeps the checkpoints"
    step_at_pause = kept[0].step_number
    assert step_at_pause < 220, "paused midway"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job.id)

    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status != "paused"
    assert step_at_pause in [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data]

    def trained_past_the_checkpoint():
        status = get_json(cluster, "ftj", job.id, "-n", namespace).get("status", {})
        return status.get("phase") == "Training" and status.get("progress", {}).get("step", 0) > step_at_pause
    wait_for(trained_past_the_checkpoint, timeout=300, what="training to go on from the checkpoint", interval=1)

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    wait_for(lambda: not trainer_pods(cluster, namespace, job.id), timeout=300, what="cancel to stop the trainer")
    wait_for(lambda: get_json(cluster, "ftj", job.id, "-n", namespace)["status"]["phase"] == "Suspended",
             timeout=120, what="the operator to report the cancelled job Suspended")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)
    assert "The job was cancelled" in [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
