"""Object storage without a store: the SigV4 signer against AWS's published example, where a
remote source lands on the volume, folders of shards as dataset sources, the push's retries
and the status it reports. The store itself is exercised in tests/cluster/test_object_storage_minio.py."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from finetune_api import layout
from finetune_api.trainer_config import TrainerConfig
from finetune_trainer import push as push_mod
from finetune_trainer.data.load import SourceError, read_records
from finetune_trainer.fetch import remote_locations
from finetune_trainer.objectstore import Credentials, ObjectStoreError, sign_v4
from finetune_trainer.reporting import Progress


def test_sigv4_matches_the_aws_documented_get_object_example():
    # "GET Object" example of the S3 SigV4 documentation (header-based authentication).
    creds = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    headers = sign_v4("GET", "examplebucket.s3.amazonaws.com", "/test.txt", {}, {"Range": "bytes=0-9"},
                      "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", creds, "us-east-1",
                      now=dt.datetime(2013, 5, 24, tzinfo=dt.timezone.utc))
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


def test_without_a_key_pair_requests_go_unsigned_and_credentials_never_print():
    headers = sign_v4("GET", "h", "/b/k", {}, {}, "x", Credentials(), "us-east-1")
    assert "authorization" not in headers
    assert "SECRET" not in repr(Credentials("AKIA", "SECRET"))


def config(tmp_path: Path, **dataset) -> TrainerConfig:
    return TrainerConfig.from_dict({
        "model": {"source": "s3://models/tiny/"},
        "method": {"type": "lora"},
        "dataset": {"source": "s3://data/train.jsonl", "format": "instruction", **dataset},
        "output": {"pushUri": "s3://out/run-1"},
        "paths": {"root": str(tmp_path)}})


def test_remote_sources_resolve_to_their_download_folder_on_the_volume(tmp_path):
    cfg = config(tmp_path, evalSource="https://example.org/eval.jsonl",
                 mix={"source": "pvc://shared/general.jsonl", "ratio": 0.1})

    assert remote_locations(cfg) == ["s3://models/tiny/", "s3://data/train.jsonl",
                                     "https://example.org/eval.jsonl"]
    resolved = cfg.paths.resolve("s3://data/train.jsonl")
    assert resolved == str(tmp_path / layout.remote_source("s3://data/train.jsonl"))
    assert resolved.endswith("/train.jsonl") and "/sources/" in resolved
    assert cfg.paths.resolve("s3://models/tiny/").endswith("/tiny")
    assert cfg.paths.resolve("https://example.org/eval.jsonl?x=1").endswith("/eval.jsonl")


def test_a_folder_of_shards_is_read_in_name_order_and_errors_name_the_shard(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"n": 2}\nnot json\n')
    (tmp_path / "a.jsonl").write_text('{"n": 1}\n')
    (tmp_path / ".hidden.jsonl").write_text('{"n": 99}\n')
    (tmp_path / "notes.txt").write_text("ignored")

    items = list(read_records(str(tmp_path)))

    assert [r["n"] for _, r, e in items if e is None] == [1, 2]
    assert [w for w, _, e in items if e is not None] == ["b.jsonl line 2"]
    assert [e.split(":")[0] for _, _, e in items if e is not None] == ["b.jsonl line 2"]


def test_a_folder_without_data_files_is_refused_by_name(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="folder holds no .jsonl"):
        list(read_records(str(tmp_path)))


class FlakyStore:
    def __init__(self, failures: int):
        self.failures, self.uploads = failures, []

    def upload(self, bucket, key, path):
        if self.failures:
            self.failures -= 1
            raise ObjectStoreError(f"PUT s3://{bucket}/{key}: HTTP 503 SlowDown: try later", 503)
        self.uploads.append((bucket, key))


def artifacts(cfg) -> dict:
    adapter = cfg.paths.artifacts / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (cfg.paths.artifacts / "README.md").write_text("# card")
    return {"adapter": adapter}


def test_push_retries_with_backoff_then_reports_where_it_published(tmp_path):
    cfg = config(tmp_path)
    store, slept = FlakyStore(failures=2), []

    result = push_mod.push(cfg, artifacts(cfg), s3=lambda: store, sleep=slept.append)

    assert result == {"pushed": "s3://out/run-1"}
    assert slept == [push_mod.BACKOFF_SECONDS, 2 * push_mod.BACKOFF_SECONDS]
    assert sorted(store.uploads) == [("out", "run-1/README.md"), ("out", "run-1/adapter/adapter_config.json")]


def test_a_push_that_keeps_failing_reports_why_without_failing_the_run(tmp_path):
    cfg = config(tmp_path)
    store = FlakyStore(failures=100)

    result = push_mod.push(cfg, artifacts(cfg), s3=lambda: store, sleep=lambda s: None)

    assert set(result) == {"pushError"}
    assert "HTTP 503 SlowDown" in result["pushError"] and f"attempt {push_mod.ATTEMPTS} of" in result["pushError"]


def test_status_patch_carries_artifacts_best_checkpoint_and_source_digests():
    p = Progress(latest_checkpoint="/workspace/checkpoints/checkpoint-12", checkpoint_count=2,
                 best_checkpoint="/workspace/checkpoints/checkpoint-6",
                 artifacts={"adapter": "/workspace/artifacts/adapter", "pushed": "s3://out/run-1"},
                 sources=[{"location": "s3://data/train.jsonl", "path": "/workspace/sources/x/train.jsonl",
                           "sha256": "0" * 64, "bytes": 10}])
    status = p.status_patch()["status"]
    assert status["checkpoints"] == {"latest": "/workspace/checkpoints/checkpoint-12", "count": 2,
                                     "best": "/workspace/checkpoints/checkpoint-6"}
    assert status["artifacts"]["pushed"] == "s3://out/run-1"
    assert json.dumps(status["sources"])


def test_status_evaluation_carries_generation_scores_and_truncated_answers():
    from finetune_trainer.train import ANSWER_CHARS, evaluation_status

    report = {"evalLoss": 1.5, "perplexity": 4.48,
              "scores": {"base": {"rouge1": 0.1, "bleu": 2.0}, "finetuned": {"rouge1": 0.6, "bleu": 30.0}},
              "generations": [{"prompt": "Describe a teapot.", "reference": None, "base": "x" * 2000,
                               "finetuned": "Arr"}] * 25}

    status = evaluation_status(report)

    assert status["scores"] == {"base": {"rouge1": 0.1, "bleu": 2.0}, "finetuned": {"rouge1": 0.6, "bleu": 30.0}}
    assert len(status["answers"]) == 20 and len(status["answers"][0]["base"]) == ANSWER_CHARS
    assert "reference" not in status["answers"][0] and status["answers"][0]["finetuned"] == "Arr"
