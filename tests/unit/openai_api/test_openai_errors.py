"""Errors leave the service in OpenAI's shape, and uploads are refused with the line named.

The HTTP checks run the real aiohttp application; the requests here are refused before any
Kubernetes call (no credentials, unknown routes), so no cluster is needed. Authentication with
real tokens and keys is tested against the local control plane (tests/cluster/test_openai_api_e2e.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from finetune_openai.auth import Authenticator, api_key_secret, key_hash, key_secret_name, new_api_key
from finetune_openai.errors import ApiError
from finetune_openai.files import FileStore, detect_format, validate
from finetune_openai.server import Api, ApiConfig


class NoCluster:
    """Any Kubernetes call is a test failure: these requests must be refused before one."""

    def __getattr__(self, name):
        raise AssertionError(f"unexpected Kubernetes call {name}")


def request(tmp_path: Path, method: str, path: str, **kw) -> tuple[int, dict]:
    async def go():
        api = Api(ApiConfig(files_dir=tmp_path), NoCluster())
        async with TestClient(TestServer(api.app())) as client:
            resp = await client.request(method, path, **kw)
            return resp.status, await resp.json()
    return asyncio.run(go())


def assert_openai_error(body: dict, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}])
@pytest.mark.parametrize("method, path", [("GET", "/v1/files"), ("POST", "/v1/fine_tuning/jobs"),
                                          ("GET", "/v1/fine_tuning/jobs/ftjob-x/events"), ("POST", "/v1/chat/completions"),
                                          ("GET", "/v1/models")])
def test_no_bearer_token_is_401_in_openai_shape(tmp_path, method, path, headers):
    status, body = request(tmp_path, method, path, headers=headers)
    assert status == 401
    assert_openai_error(body, "invalid_api_key")
    assert body["error"]["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_answer_in_openai_shape(tmp_path):
    status, body = request(tmp_path, "GET", "/v1/assistants")
    assert status == 404
    assert_openai_error(body, "not_found")
    status, body = request(tmp_path, "PUT", "/v1/files")
    assert status == 405
    assert_openai_error(body, "method_not_allowed")


def test_error_types_follow_the_status():
    assert ApiError(429, "slow down", code="rate_limit_exceeded").body()["error"]["type"] == "rate_limit_error"
    assert ApiError(403, "no").body()["error"]["type"] == "permission_error"
    assert ApiError(409, "busy").body()["error"]["type"] == "invalid_request_error"


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


CHAT = {"messages": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Arr!"}]}
TOOLS = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                      {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                          "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
                      {"role": "assistant", "content": "It rains in Oslo."}],
         "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}}}}]}


def test_openai_chat_files_with_tools_pass_the_trainer_validator(tmp_path):
    path = write(tmp_path / "ok.jsonl", [CHAT, TOOLS])
    assert detect_format(path) == "chat"
    validate(path, "chat")


def test_a_broken_line_is_refused_naming_the_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", [CHAT, CHAT, '{"messages": [{"role": "user", "content": "Hi"}', CHAT])
    with pytest.raises(ApiError) as exc:
        validate(path, detect_format(path))
    assert exc.value.status == 400 and exc.value.param == "file" and exc.value.code == "invalid_file_format"
    assert "line 3:" in exc.value.message and "line 1:" not in exc.value.message


def test_openai_preference_files_pass_the_trainer_validator_as_is(tmp_path):
    path = write(tmp_path / "dpo.jsonl", [{"input": {"messages": [{"role": "user", "content": "Hi"}]},
                                           "preferred_output": [{"role": "assistant", "content": "Arr"}],
                                           "non_preferred_output": [{"role": "assistant", "content": "Hello"}]}])
    assert detect_format(path) == "preference"
    validate(path, "preference")


def test_stored_bytes_are_limited_per_namespace(tmp_path):
    store = FileStore(tmp_path, "openai-files", max_stored_bytes=100, max_file_bytes=1000)
    upload = store.new_upload("a")
    upload.write(b"x" * 80)
    upload.close()
    store.commit("a", upload, file_id="file-" + "0" * 24, filename="a.jsonl", purpose="fine-tune", fmt="chat")
    second = store.new_upload("a")
    with pytest.raises(ApiError) as exc:
        second.write(b"x" * 30)
    assert exc.value.status == 429 and exc.value.code == "quota_exceeded"
    assert not second.path.exists()
    assert store.new_upload("b").limit == 100  # another namespace has its own budget
    assert store.data_file("a", "file-" + "0" * 24, "training_file").source == \
        "pvc://openai-files/files/file-" + "0" * 24 + ".jsonl"


def test_an_api_key_is_stored_only_as_its_hash():
    key = new_api_key()
    secret = api_key_secret(key, "team-a")
    assert key not in json.dumps(secret)
    assert secret["stringData"] == {"sha256": key_hash(key), "namespace": "team-a"}
    assert secret["metadata"]["name"] == key_secret_name(key_hash(key))


def test_a_key_of_another_namespace_cannot_be_pointed_elsewhere():
    import base64

    key = new_api_key()

    class Secrets:
        def get_secret(self, namespace, name):
            s = api_key_secret(key, "team-a")
            return {"metadata": s["metadata"],
                    "data": {k: base64.b64encode(v.encode()).decode() for k, v in s["stringData"].items()}}

    auth = Authenticator(Secrets(), "finetune-system")
    assert auth.authenticate(f"Bearer {key}").namespace == "team-a"
    with pytest.raises(ApiError) as exc:
        auth.authenticate(f"Bearer {key}", "team-b")
    assert exc.value.status == 403
    with pytest.raises(ApiError) as exc:
        auth.authenticate(f"Bearer {key}x")
    assert exc.value.status == 401


def test_a_result_file_is_read_from_its_jobs_folder_on_the_files_claim(tmp_path):
    from finetune_openai.mapping import result_file_id

    store = FileStore(tmp_path, "openai-files", max_stored_bytes=100, max_file_bytes=100)
    job_id = "ftjob-" + "e" * 24
    assert store.results_location("team-a", job_id) == f"pvc://openai-files/results/{job_id}/results.csv"
    assert store.result_record("team-a", job_id) is None, "no file before the trainer wrote one"
    path = store.results_path("team-a", job_id)
    path.parent.mkdir(parents=True)
    path.write_text("step,train_loss\n2,1.5\n")
    record = store.result_record("team-a", job_id)
    assert (record["id"], record["purpose"], record["bytes"]) == (result_file_id(job_id), "fine-tune-results", 22)
