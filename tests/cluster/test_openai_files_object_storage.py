"""`finetune-operator api --files-store s3://…`: uploads in the dev cluster's object store (MinIO,
built from its Go module) instead of a claim, with each namespace's own credentials.

Everything is real: the control plane with RBAC, the API process with the chart's own RBAC for
this mode (it may `get` only Secrets named `finetune-object-storage`), MinIO, the operator, and
the trainer on the local node reading the upload from s3:// and writing its result file back
there. No vLLM: the job is cancelled once its first result file is in the store.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

import openai
import pytest
from openai import OpenAI

from finetune_devcluster.cluster import S3_ACCESS_KEY, free_port
from finetune_devcluster.openai_local import LocalOpenAIApi
from finetune_openai.mapping import result_file_id
from finetune_trainer.objectstore import Credentials, S3Client
from tests.cluster.test_openai_api_e2e import JOB_TEMPLATE, client_for, follow
from tests.fixtures.cluster import get_json, wait_for
from tests.fixtures.ml import learnable_chat_records, write_jsonl

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SECRET = "finetune-object-storage"
# Long enough that the job is still training when the test cancels it: no vLLM is started.
TEMPLATE = {**JOB_TEMPLATE, "training": {**JOB_TEMPLATE["training"], "maxSteps": 100000, "saveSteps": 4}}


@pytest.fixture
def store(cluster):
    env = cluster.s3_env()
    s3 = S3Client(env["AWS_ENDPOINT_URL"], env["AWS_REGION"],
                  Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]))
    bucket = f"openai-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(bucket)
    return s3, bucket, env


@pytest.fixture
def s3_api(cluster, crds, namespace, operator, tiny_model, tmp_path, store):
    s3, bucket, env = store
    cluster.kubectl("create", "namespace", namespace, check=False)
    cluster.kubectl("create", "secret", "generic", SECRET, "-n", namespace,
                    f"--from-literal=AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}",
                    f"--from-literal=AWS_REGION={env['AWS_REGION']}",
                    f"--from-literal=AWS_ENDPOINT_URL={env['S3_CLUSTER_ENDPOINT_URL']}")
    api = LocalOpenAIApi(cluster, tmp_path / "api", namespace=namespace, release=f"oas-{namespace}",
                         release_namespace=f"{namespace}-api", port=free_port(), job_template=TEMPLATE,
                         files_store=f"s3://{bucket}/openai")
    api.start(tiny_model)
    yield api
    print(f"--- the OpenAI API's log ---\n{api.tail(120)}")  # shown when the test failed
    api.stop()
    cluster.kubectl("delete", "namespace", api.release_namespace, "--wait=false", check=False)


def keys(s3: S3Client, bucket: str, prefix: str) -> set[str]:
    return {o.key for o in s3.list(bucket, prefix)}


def test_uploads_live_in_object_storage_and_the_trainer_reads_them_with_the_namespaces_secret(
        cluster, namespace, s3_api, store, tmp_path):
    s3, bucket, env = store
    client = client_for(s3_api, s3_api.create_key())
    files = f"openai/{namespace}/files/"

    # A broken line: 400 naming it, and nothing reaches the store.
    records = learnable_chat_records()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(records[0]) + "\n" + '{"messages": [' + "\n")
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=broken.open("rb"), purpose="fine-tune")
    assert refused.value.status_code == 400 and "line 2" in refused.value.message
    assert keys(s3, bucket, files) == set()

    # An upload is an object (and its record) under the namespace's prefix, read back whole.
    data = write_jsonl(tmp_path / "pirate.jsonl", records)
    uploaded = client.files.create(file=data.open("rb"), purpose="fine-tune")
    assert keys(s3, bucket, files) == {f"{files}{uploaded.id}.jsonl", f"{files}{uploaded.id}.json"}
    assert s3.get_bytes(bucket, f"{files}{uploaded.id}.jsonl") == data.read_bytes()
    assert client.files.content(uploaded.id).read() == data.read_bytes()
    assert [f.id for f in client.files.list().data] == [uploaded.id]
    assert not list((tmp_path / "api" / "openai-files").glob("**/*.part")), "the scratch copy is gone"

    # The job reads it from s3:// with the namespace's Secret, and writes its result file there.
    job = client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny-llama", suffix="s3")
    ftj = get_json(cluster, "ftj", job.id, "-n", namespace)
    assert ftj["spec"]["dataset"]["source"] == f"s3://{bucket}/{files}{uploaded.id}.jsonl"
    assert ftj["spec"]["objectStorage"] == {"secretRef": {"name": SECRET}}
    assert ftj["spec"]["output"]["resultsFile"] == f"s3://{bucket}/openai/{namespace}/results/{job.id}/results.csv"

    results_key = f"openai/{namespace}/results/{job.id}/results.csv"
    wait_for(lambda: s3.head(bucket, results_key), timeout=600, interval=2,
             what="the trainer to upload its first results.csv (at its first checkpoint)")
    sources = {x["location"]: x for x in get_json(cluster, "ftj", job.id, "-n", namespace)["status"]["sources"]}
    assert sources[ftj["spec"]["dataset"]["source"]]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    client.fine_tuning.jobs.cancel(job.id)
    follow(client, job.id, lambda j: j.status == "cancelled", timeout=300)

    csv = client.files.content(result_file_id(job.id)).read().decode()
    assert csv.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(csv.splitlines()) >= 2

    # The secret key is nowhere a user or an operator looks.
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in json.dumps(get_json(cluster, "ftj", job.id, "-n", namespace))
    assert secret not in cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert secret not in s3_api.tail(10000)

    # A finished job's file can be deleted: both objects go.
    client.files.delete(uploaded.id)
    assert keys(s3, bucket, files) == set()


def test_a_namespace_without_the_secret_gets_a_clear_400_and_the_api_reads_no_other_secret(
        cluster, namespace, s3_api, store, tmp_path):
    s3, bucket, _ = store
    other = f"{namespace}-b"
    cluster.kubectl("create", "namespace", other)
    try:
        client = client_for(s3_api, s3_api.create_key(other))
        data = write_jsonl(tmp_path / "pirate.jsonl", learnable_chat_records())
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(file=data.open("rb"), purpose="fine-tune")
        assert refused.value.code == "object_storage_not_configured"
        assert f"'{SECRET}'" in refused.value.message and other in refused.value.message
        assert keys(s3, bucket, f"openai/{other}/") == set()

        # The chart's RBAC for this mode: that Secret name in any namespace, no other Secret.
        sa = f"system:serviceaccount:{s3_api.release_namespace}:" + next(
            name for kind, name in s3_api.cluster_objects if kind == "clusterrole")
        can = lambda *a: cluster.kubectl("auth", "can-i", *a, "--as", sa, check=False).stdout.strip()
        assert can("get", f"secret/{SECRET}", "-n", other) == "yes"
        assert can("get", "secret/other", "-n", other) == "no"
        assert can("list", "secrets", "-n", other) == "no"
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
