"""output.push to hf://: huggingface_hub's own client against a local stand-in for the Hugging
Face Hub (the Hub is the internet, which tests cannot reach). The stand-in implements the four
endpoints an upload uses (create repo, validate a model card, preupload, commit) and checks the bearer token."""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading

import pytest

from finetune_api.trainer_config import TrainerConfig
from finetune_trainer import push as push_mod

TOKEN = "hf_standin_token_123"


@pytest.fixture
def hub():
    state = {"repos": {}, "files": {}, "fail_commits": False, "unknown": [], "validated": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _json(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._json(401, {"error": "Invalid credentials"})
            if self.path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}"
                state["repos"][repo] = req
                return self._json(200, {"url": f"{state['url']}/{repo}", "name": repo})
            if self.path == "/api/validate-yaml":  # the Hub checks a model card's metadata
                state["validated"].append(json.loads(body)["content"])
                return self._json(200, {"errors": [], "warnings": []})
            match = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit)/", self.path)
            if match is None:
                state["unknown"].append(self.path)
                return self._json(404, {"error": f"the stand-in has no {self.path}"})
            repo, op = match.groups()
            if op == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                   "shouldIgnore": False} for f in files]})
            if op == "commit":
                if state["fail_commits"]:
                    return self._json(500, {"error": "the stand-in is down"})
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        state["files"][f"{repo}/{item['value']['path']}"] = base64.b64decode(item["value"]["content"])
                return self._json(200, {"commitUrl": f"{state['url']}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()


def config(tmp_path, private=True) -> TrainerConfig:
    cfg = TrainerConfig.from_dict({
        "model": {"source": "/m"}, "dataset": {"source": "x.jsonl"},
        "output": {"pushUri": "hf://acme/support-bot", "pushTokenEnv": "PUSH_TOKEN", "pushPrivate": private},
        "paths": {"root": str(tmp_path)}})
    adapter = cfg.paths.artifacts / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00weights\x01")
    (cfg.paths.artifacts / "README.md").write_text("# support-bot card")
    return cfg


def test_push_to_the_hub_creates_a_private_repo_and_commits_card_and_adapter(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub["url"])
    monkeypatch.setenv("PUSH_TOKEN", TOKEN)
    cfg = config(tmp_path)

    result = push_mod.push(cfg, {"adapter": cfg.paths.artifacts / "adapter"}, sleep=lambda s: None)

    assert result == {"pushed": "hf://acme/support-bot"}
    assert hub["repos"]["acme/support-bot"]["visibility"] == "private"
    assert hub["validated"] == ["# support-bot card"] and not hub["unknown"]
    assert hub["files"] == {"acme/support-bot/README.md": b"# support-bot card",
                            "acme/support-bot/adapter/adapter_config.json": b'{"r": 8}',
                            "acme/support-bot/adapter/adapter_model.safetensors": b"\x00weights\x01"}


def test_a_public_repo_when_asked(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub["url"])
    monkeypatch.setenv("PUSH_TOKEN", TOKEN)
    cfg = config(tmp_path, private=False)
    push_mod.push(cfg, {"adapter": cfg.paths.artifacts / "adapter"}, sleep=lambda s: None)
    assert hub["repos"]["acme/support-bot"]["visibility"] == "public"


def test_a_hub_that_keeps_failing_leaves_a_push_error_without_the_token(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub["url"])
    monkeypatch.setenv("PUSH_TOKEN", TOKEN)
    hub["fail_commits"] = True
    cfg = config(tmp_path)

    result = push_mod.push(cfg, {"adapter": cfg.paths.artifacts / "adapter"}, sleep=lambda s: None)

    assert set(result) == {"pushError"} and "500" in result["pushError"]
    assert TOKEN not in result["pushError"]
