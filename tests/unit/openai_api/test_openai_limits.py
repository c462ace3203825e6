"""Per-namespace limits (429) and OpenAI's 409s, through the real aiohttp application.

The Kubernetes API here is an in-memory stand-in holding FineTuneJobs by namespace (the same
calls against the real API server, with TokenReview and SubjectAccessReview, run in
tests/cluster/test_openai_api_e2e.py); authentication is stubbed to one namespace per token.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer

from finetune_openai.auth import Principal
from finetune_openai.server import Api, ApiConfig

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}


class Jobs:
    """FineTuneJobs by namespace; `phase` sets a job's status.phase as the operator would."""

    def __init__(self):
        self.objs: dict[tuple[str, str], dict] = {}

    def create_job(self, namespace, body):
        body = json.loads(json.dumps(body))
        body["metadata"]["creationTimestamp"] = "2026-11-30T10:00:00Z"
        self.objs[(namespace, body["metadata"]["name"])] = body
        return body

    def get_job(self, namespace, name):
        return self.objs.get((namespace, name))

    def list_jobs(self, namespace):
        return [o for (ns, _), o in self.objs.items() if ns == namespace]

    def patch_job(self, namespace, name, patch):
        obj = self.objs[(namespace, name)]
        obj["spec"].update(patch.get("spec", {}))
        obj["metadata"].setdefault("annotations", {}).update((patch.get("metadata") or {}).get("annotations", {}))
        return obj

    def phase(self, name, phase):
        for (_, n), obj in self.objs.items():
            if n == name:
                obj["status"] = {"phase": phase, "completionTime": "2026-11-30T10:05:00Z"}


class OneNamespacePerToken:
    def authenticate(self, header, namespace=None):
        return Principal(namespace=header.removeprefix("Bearer "), user="u")

    def authorize(self, principal, verb):
        return None


def run(tmp_path: Path, scenario, **cfg):
    jobs = Jobs()

    async def go():
        api = Api(ApiConfig(files_dir=tmp_path, models={"tiny-llama": "pvc://openai-files/models/tiny-llama"}, **cfg),
                  jobs, authenticator=OneNamespacePerToken())
        async with TestClient(TestServer(api.app())) as client:
            return await scenario(client, jobs)
    return asyncio.run(go())


async def upload(client, namespace: str) -> str:
    form = FormData()
    form.add_field("purpose", "fine-tune")
    form.add_field("file", "\n".join(json.dumps(CHAT) for _ in range(3)) + "\n", filename="a.jsonl")
    resp = await client.post("/v1/files", data=form, headers={"Authorization": f"Bearer {namespace}"})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["id"]


async def create(client, namespace: str, file_id: str):
    resp = await client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id},
                             headers={"Authorization": f"Bearer {namespace}"})
    return resp.status, await resp.json()


def test_a_namespace_runs_at_most_its_limit_of_jobs_and_others_are_not_counted(tmp_path):
    async def scenario(client, jobs):
        file_a, file_b = await upload(client, "team-a"), await upload(client, "team-b")
        first = await create(client, "team-a", file_a)
        second = await create(client, "team-a", file_a)
        other = await create(client, "team-b", file_b)
        jobs.phase(first[1]["id"], "Succeeded")
        after_finish = await create(client, "team-a", file_a)
        return first, second, other, after_finish

    first, second, other, after_finish = run(tmp_path, scenario, max_running_jobs=1)
    assert first[0] == 200
    assert second[0] == 429 and second[1]["error"]["code"] == "rate_limit_exceeded"
    assert "team-a" in second[1]["error"]["message"]
    assert other[0] == 200, "another namespace has its own limit"
    assert after_finish[0] == 200, "a finished job no longer counts"


def test_stored_bytes_over_the_namespace_limit_are_refused_with_429(tmp_path):
    async def scenario(client, jobs):
        await upload(client, "team-a")
        form = FormData()
        form.add_field("purpose", "fine-tune")
        form.add_field("file", json.dumps(CHAT) + "\n", filename="b.jsonl")
        resp = await client.post("/v1/files", data=form, headers={"Authorization": "Bearer team-a"})
        return resp.status, await resp.json(), await upload(client, "team-b")

    status, body, _ = run(tmp_path, scenario, max_stored_bytes=len(json.dumps(CHAT)) * 3 + 3)
    assert status == 429 and body["error"]["code"] == "quota_exceeded"


def test_transitions_openai_refuses_are_409(tmp_path):
    async def scenario(client, jobs):
        file_id = await upload(client, "team-a")
        job_id = (await create(client, "team-a", file_id))[1]["id"]
        auth = {"Authorization": "Bearer team-a"}
        answers = {}
        answers["resume running"] = (await client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth)).status
        answers["pause"] = (await client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth)).status
        answers["pause paused"] = (await client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth)).status
        answers["delete file in use"] = (await client.delete(f"/v1/files/{file_id}", headers=auth)).status
        answers["cancel"] = (await client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)).status
        answers["cancel cancelled"] = (await client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)).status
        answers["resume cancelled"] = (await client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth)).status
        done_id = (await create(client, "team-a", file_id))[1]["id"]
        jobs.phase(done_id, "Succeeded")
        resp = await client.post(f"/v1/fine_tuning/jobs/{done_id}/cancel", headers=auth)
        answers["cancel succeeded"] = resp.status
        answers["error type"] = (await resp.json())["error"]["type"]
        return answers

    assert run(tmp_path, scenario) == {
        "resume running": 409, "pause": 200, "pause paused": 409, "delete file in use": 409, "cancel": 200,
        "cancel cancelled": 409, "resume cancelled": 409, "cancel succeeded": 409,
        "error type": "invalid_request_error"}
