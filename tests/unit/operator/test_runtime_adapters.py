"""Adapters loaded at run time: the reconcile logic against stand-in vLLM replicas.

Each replica is a small HTTP server speaking the three endpoints of vLLM's runtime LoRA API
the operator uses (`GET /v1/models`, `POST /v1/load_lora_adapter`,
`POST /v1/unload_lora_adapter`), with vLLM's answers for a name loaded twice or unknown. It
stands in for vLLM only to run several replicas at once (the real server binds host port
8000 on the local node); `tests/cluster/test_runtime_adapters_cluster.py` runs the real one.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finetune_operator.serving import adapters, common
from finetune_operator.serving.checks import Problem
from finetune_operator.serving.status import status_for
from tests.fixtures.inference import finetunejob, inferenceservice, parse


class FakeVLLM:
    def __init__(self, loaded: dict[str, str] | None = None, refuse: set[str] | None = None,
                 losses: dict[str, float] | None = None) -> None:
        self.loaded = dict(loaded or {})  # name -> path
        self.losses = dict(losses or {})  # model -> the log-probability it gives every token, negated
        self.refuse = set(refuse or ())   # paths whose load fails
        self.calls: list[tuple[str, dict]] = []
        self.scored: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                cards = [{"id": "base", "root": "/model", "parent": None}]
                cards += [{"id": n, "root": p, "parent": "base"} for n, p in owner.loaded.items()]
                self._send(200, {"object": "list", "data": cards})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":  # one token per character; chats as "role: content "
                    text = body.get("prompt") or "".join(f"{m['role']}: {m['content']} " for m in body["messages"])
                    return self._send(200, {"tokens": [ord(c) for c in text], "count": len(text)})
                if self.path == "/detokenize":
                    return self._send(200, {"prompt": "".join(chr(t) for t in body["tokens"])})
                if self.path == "/v1/completions":  # every allowed token has the model's log-probability
                    assert body["max_tokens"] == 1 and len(body["allowed_token_ids"]) == 1
                    owner.scored.append(body)
                    loss = owner.losses[body["model"]]
                    return self._send(200, {"choices": [{"text": "x", "logprobs": {"token_logprobs": [-loss]}}]})
                owner.calls.append((self.path, body))
                name = body["lora_name"]
                if self.path == "/v1/load_lora_adapter":
                    if name in owner.loaded and not body.get("load_inplace"):
                        return self._send(400, {"error": {"message": f"The lora adapter '{name}' has "
                                                          "already been loaded."}})
                    if body["lora_path"] in owner.refuse:
                        return self._send(500, {"error": {"message": "Loading lora failed: no adapter"}})
                    owner.loaded[name] = body["lora_path"]
                    return self._send(200, "Success")
                if name not in owner.loaded:
                    return self._send(404, {"error": {"message": f"The lora adapter '{name}' cannot be found."}})
                del owner.loaded[name]
                self._send(200, "Success")

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def replicas():
    made: dict[str, FakeVLLM] = {}
    yield made
    for r in made.values():
        r.close()


def pod(name: str, ip: str, revision: str = "rev-1", ready: bool = True, node: str = "n1") -> dict:
    return {"metadata": {"name": name, "annotations": {common.REVISION_ANNOTATION: revision}},
            "spec": {"nodeName": node},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def case(*names: str, job_claim: str = "shared"):
    isvc, jobs = parse(inferenceservice("bot", adapters=[{"name": n, "fineTuneJobRef": {"name": n}} for n in names]),
                       *[finetunejob(n, uid=f"uid-{n}", existing_claim=job_claim) for n in names])
    return isvc, jobs, adapters.wanted(isvc, jobs)


def sync(isvc, want, pods, servers, previous=None, revision="rev-1"):
    return adapters.sync(isvc, want, pods, revision, previous, simulated=lambda node: node == "kwok-0",
                         server_for=lambda ip: adapters.HTTPServer(servers[ip].url))


def test_every_replica_converges_whatever_it_had_loaded(replicas):
    """Three replicas: a new one with nothing, one serving an adapter since removed from the
    spec, one already right. After one sync every replica serves exactly the spec's adapters."""
    isvc, jobs, want = case("a", "b")
    path_a, path_b = want["a"].path, want["b"].path
    assert path_a == "/adapters/shared/jobs/a/artifacts/adapter"
    replicas["10.0.0.1"] = FakeVLLM()
    replicas["10.0.0.2"] = FakeVLLM({"old": "/adapters/shared/jobs/old/artifacts/adapter", "a": path_a})
    replicas["10.0.0.3"] = FakeVLLM({"a": path_a, "b": path_b})
    pods = [pod("p1", "10.0.0.1"), pod("p2", "10.0.0.2"), pod("p3", "10.0.0.3")]
    previous = {"replicaAdapters": [{"pod": "p2", "adapters": [{"name": "a", "version": "uid-a"}]},
                                    {"pod": "p3", "adapters": [{"name": "a", "version": "uid-a"},
                                                               {"name": "b", "version": "uid-b"}]}]}
    result = sync(isvc, want, pods, replicas, previous)
    assert [(r.pod, r.loaded, r.error) for r in result] == [
        (p, {"a": "uid-a", "b": "uid-b"}, None) for p in ("p1", "p2", "p3")]
    assert all(r.loaded == {"a": path_a, "b": path_b} for r in replicas.values())
    assert replicas["10.0.0.3"].calls == []  # nothing to do there: nothing done
    assert ("/v1/unload_lora_adapter", {"lora_name": "old"}) in replicas["10.0.0.2"].calls
    assert adapters.served(isvc, result) == ["bot", "a", "b"]
    # A second pass changes nothing.
    again = sync(isvc, want, pods, replicas, {"replicaAdapters": [r.to_status() for r in result]})
    assert again == result and all(len(r.calls) <= 2 for r in replicas.values())


def test_a_retrained_adapter_is_reloaded_in_place_under_its_name(replicas):
    """A FineTuneJob recreated under the same name writes to the same path: its uid is the
    version, and a new uid reloads the adapter in place (no gap without the name)."""
    isvc, jobs, want = case("a")
    replicas["10.0.0.1"] = FakeVLLM({"a": want["a"].path})
    previous = {"replicaAdapters": [{"pod": "p1", "adapters": [{"name": "a", "version": "uid-old"}]}]}
    [r] = sync(isvc, want, [pod("p1", "10.0.0.1")], replicas, previous)
    assert r.loaded == {"a": "uid-a"}
    assert replicas["10.0.0.1"].calls == [("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": want["a"].path,
                                                                     "load_inplace": True})]


def test_a_failed_load_is_reported_and_served_models_lists_only_what_every_replica_serves(replicas):
    isvc, jobs, want = case("a", "b")
    replicas["10.0.0.1"] = FakeVLLM()
    replicas["10.0.0.2"] = FakeVLLM(refuse={want["b"].path})
    pods = [pod("p1", "10.0.0.1"), pod("p2", "10.0.0.2")]
    result = sync(isvc, want, pods, replicas)
    assert result[0].error is None and result[1].loaded == {"a": "uid-a"}
    assert "loading b from /adapters/shared/jobs/b/artifacts/adapter" in result[1].error
    assert "no adapter" in result[1].error
    assert adapters.served(isvc, result) == ["bot", "a"]

    status = status_for(isvc, [], rolled_out(2), pods, "rev-1", [], "2026-01-01T00:00:00Z", result, want)
    assert status["phase"] == "Degraded" and status["servedModels"] == ["bot", "a"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "AdapterLoadFailed" and "pod p2" in ready["message"]
    assert status["replicaAdapters"][1] == {"pod": "p2", "adapters": [{"name": "a", "version": "uid-a"}],
                                            "error": result[1].error}
    # The retry finds the adapter fixed and converges.
    replicas["10.0.0.2"].refuse.clear()
    result = sync(isvc, want, pods, replicas, {"replicaAdapters": status["replicaAdapters"]})
    status = status_for(isvc, [], rolled_out(2), pods, "rev-1", [], "2026-01-01T00:00:00Z", result, want)
    assert status["phase"] == "Ready" and status["servedModels"] == ["bot", "a", "b"]


def test_a_restarted_or_new_replica_gets_the_adapters_and_old_revisions_are_only_read(replicas):
    """A restarted container has lost its adapters: /v1/models says so whatever the status
    recorded. A pod of an older revision (mid-rollout) is read, not changed; an unready pod
    and a pod on a simulated node are not asked."""
    isvc, jobs, want = case("a")
    replicas["10.0.0.1"] = FakeVLLM()  # restarted: the status still says it had `a`
    replicas["10.0.0.2"] = FakeVLLM()
    replicas["10.0.0.3"] = FakeVLLM()
    previous = {"replicaAdapters": [{"pod": "p1", "adapters": [{"name": "a", "version": "uid-a"}]}]}
    pods = [pod("p1", "10.0.0.1"), pod("p2", "10.0.0.2", revision="rev-0"), pod("p3", "10.0.0.3", ready=False),
            pod("p4", "10.0.0.4", node="kwok-0")]
    result = sync(isvc, want, pods, replicas, previous)
    assert [(r.pod, r.loaded, r.simulated) for r in result] == [
        ("p1", {"a": "uid-a"}, False), ("p2", {}, False), ("p4", {"a": "uid-a"}, True)]
    assert replicas["10.0.0.2"].calls == replicas["10.0.0.3"].calls == []
    assert adapters.served(isvc, result) == ["bot"]  # p2 (old revision) does not serve `a`


def test_with_problems_in_the_spec_nothing_is_loaded_or_unloaded(replicas):
    isvc, jobs, want = case("a")
    replicas["10.0.0.1"] = FakeVLLM({"old": "/x"})
    [r] = sync(isvc, None, [pod("p1", "10.0.0.1")], replicas)
    assert replicas["10.0.0.1"].calls == [] and r.loaded == {"old": ""}
    status = status_for(isvc, [Problem("FineTuneJobNotFound", "a: not found", True)], rolled_out(1), [pod("p1", "x")], "rev-1",
                        [], "2026-01-01T00:00:00Z", [r], want)
    assert status["phase"] == "Pending" and status["servedModels"] == ["bot"]


def test_an_unreachable_replica_is_an_error_not_a_hang():
    isvc, jobs, want = case("a")
    [r] = adapters.sync(isvc, want, [pod("p1", "127.0.0.1")], "rev-1", None, simulated=lambda n: False,
                        server_for=lambda ip: adapters.HTTPServer("http://127.0.0.1:9"))
    assert r.error.startswith("cannot list adapters: /v1/models:") and r.loaded == {}


def rolled_out(n: int) -> dict:
    return {"metadata": {"generation": 1}, "spec": {"replicas": n},
            "status": {"observedGeneration": 1, "replicas": n, "readyReplicas": n, "updatedReplicas": n,
                       "availableReplicas": n}}


def promotion_case(margin: float = 0.0, prompts=({"prompt": "hi", "reference": "hello"},),
                   prompt_formats: tuple[str | None, str | None] = (None, None)):
    """v1 serves as `bot`, v2 is its candidate; `prompt_formats`: their status.dataset.promptFormat."""
    def recorded(job: dict, fmt: str | None) -> dict:
        if fmt:
            job["status"]["dataset"] = {"promptFormat": fmt}
        return job

    gated = {"name": "bot", "fineTuneJobRef": {"name": "v2"}, "promotion": {"margin": margin}}
    isvc, jobs = parse(inferenceservice("srv", adapters=[gated]),
                       recorded(finetunejob("v2", uid="uid-v2", existing_claim="shared",
                                            evaluation={"prompts": list(prompts)}), prompt_formats[1]))
    v1 = parse(inferenceservice(), recorded(finetunejob("v1", uid="uid-v1", existing_claim="shared"),
                                            prompt_formats[0]))[1]["v1"]
    previous = {"promotions": [{"name": "bot", "fineTuneJob": "v1", "version": "uid-v1"}]}
    return isvc, jobs, v1, previous


def run_promotion(isvc, jobs, v1, previous, server):
    """What the handler does: plan, sync, decide, and plan and sync again once decided."""
    from finetune_operator.serving import deployment, promotion

    servers = {"10.0.0.1": server}

    def plan(status):
        return promotion.plan(isvc, jobs, adapters.wanted(isvc, jobs), promotion.records(status),
                              {"v1": v1}.get, deployment.job_adapter_path)

    want, gated, keep = plan(previous)
    assert keep == {"v1": v1} and gated["bot"].result == promotion.EVALUATING
    assert want["bot"].version == "uid-v1" and want["bot-candidate"].version == "uid-v2"
    result = sync(isvc, want, [pod("p1", "10.0.0.1")], servers, previous)
    assert server.loaded == {"bot": want["bot"].path, "bot-candidate": want["bot-candidate"].path}
    decided = promotion.decide(isvc, jobs, gated, result, lambda p: adapters.HTTPServer(server.url),
                               {"v1": v1}.get)
    status = {"replicaAdapters": [r.to_status() for r in result],
              "promotions": [r.to_status() for r in decided.values()]}
    want, gated, keep = plan(status)
    result = sync(isvc, want, [pod("p1", "10.0.0.1")], servers, status)
    return gated["bot"], result[0], promotion.condition(gated)


def test_a_candidate_is_promoted_only_when_it_beats_the_current_version_by_the_margin(replicas):
    from finetune_operator.serving import deployment

    isvc, jobs, v1, previous = promotion_case(margin=0.5)
    replicas["a"] = FakeVLLM(losses={"bot": 2.0, "bot-candidate": 1.8})
    rec, replica, condition = run_promotion(isvc, jobs, v1, previous, replicas["a"])
    assert rec.result == "Refused" and (rec.current_loss, rec.candidate_loss) == (2.0, 1.8)
    assert replica.loaded == {"bot": "uid-v1"} and "bot-candidate" not in replicas["a"].loaded
    assert replicas["a"].loaded["bot"] == deployment.job_adapter_path(v1)
    assert condition[:2] == ("False", "CandidateRefused")
    assert "evalLoss 1.8000 for v2 against 2.0000 for v1 (margin 0.5" in condition[2]

    isvc, jobs, v1, previous = promotion_case(margin=0.1)
    replicas["b"] = FakeVLLM(losses={"bot": 2.0, "bot-candidate": 1.8})
    rec, replica, condition = run_promotion(isvc, jobs, v1, previous, replicas["b"])
    assert rec.result == "Promoted" and rec.job == "v2" and replica.loaded == {"bot": "uid-v2"}
    assert replicas["b"].loaded == {"bot": adapters.wanted(isvc, jobs)["bot"].path}
    assert condition[:2] == ("True", "Promoted")
    # Teacher-forced: "hello" is 5 reference tokens, each scored after the prompt and the ones before it.
    prompt = [ord(c) for c in "### Instruction:\nhi\n\n### Response:\n"]
    assert [b["prompt"] for b in replicas["b"].scored[:5]] == [prompt + [ord(c) for c in "hello"[:k]] for k in range(5)]
    assert [b["allowed_token_ids"] for b in replicas["b"].scored[:5]] == [[ord(c)] for c in "hello"]


def test_each_version_is_scored_in_the_prompt_format_it_was_trained_with(replicas):
    """v1 was trained with the Alpaca prompt, v2 through the chat template (issue 16 item 8):
    v2 is asked with messages, which vLLM renders with the template; v1 with the Alpaca text."""
    isvc, jobs, v1, previous = promotion_case(prompt_formats=("alpaca", "chat-template"))
    replicas["a"] = FakeVLLM(losses={"bot": 2.0, "bot-candidate": 1.8})

    rec, _, _ = run_promotion(isvc, jobs, v1, previous, replicas["a"])

    assert rec.result == "Promoted"
    first = {model: next(b["prompt"] for b in replicas["a"].scored if b["model"] == model)
             for model in ("bot", "bot-candidate")}
    assert first["bot"] == [ord(c) for c in "### Instruction:\nhi\n\n### Response:\n"]
    assert first["bot-candidate"] == [ord(c) for c in "user: hi "]  # the stand-in's chat rendering


def test_a_candidate_without_references_to_score_on_is_refused(replicas):
    isvc, jobs, v1, previous = promotion_case(prompts=({"prompt": "hi"},))
    replicas["a"] = FakeVLLM(losses={"bot": 2.0, "bot-candidate": 0.1})
    rec, replica, condition = run_promotion(isvc, jobs, v1, previous, replicas["a"])
    assert rec.result == "Refused" and "no spec.evaluation.prompts with a reference" in rec.message
    assert replica.loaded == {"bot": "uid-v1"}


def test_a_prompt_rendered_otherwise_than_in_training_is_named_with_both_renderings(replicas):
    """The stand-in server renders chats as "role: content "; training used "<role>content"."""
    from finetune_operator.serving import promptcheck
    from finetune_operator.serving.status import status_for

    same = {"prompt": "hi", "text": "hi", "tokenIds": [ord("h"), ord("i")]}
    trained_text = "<user>Say hi"
    other = {"messages": [{"role": "user", "content": "Say hi"}], "text": trained_text,
             "tokenIds": [ord(c) for c in trained_text]}
    job = finetunejob("a", uid="uid-a", existing_claim="shared")
    job["status"]["artifacts"] = {"promptRenderings": [same, other]}
    isvc, jobs = parse(inferenceservice("bot", adapters=[{"name": "a", "fineTuneJobRef": {"name": "a"}}]), job)
    replicas["10.0.0.1"] = FakeVLLM()
    pods = [pod("p1", "10.0.0.1")]
    want = adapters.wanted(isvc, jobs)
    result = sync(isvc, want, pods, replicas)
    check = promptcheck.check(isvc, jobs, result, lambda p: adapters.HTTPServer(replicas["10.0.0.1"].url))
    [message] = check.mismatches
    assert message == ("a (FineTuneJob a) on pod p1: example 1: the first difference is at token 0: training had "
                       "60 '<', the server has 117 'u'; training rendered '<user>Say hi' (12 tokens), the server "
                       "renders 'user: Say hi ' (13 tokens)")
    status = status_for(isvc, [], rolled_out(1), pods, "rev-1", [], "2026-01-01T00:00:00Z", result, want,
                        None, check)
    assert status["phase"] == "Degraded"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["PromptFormatMismatch"]["status"] == "True"
    assert conditions["Ready"]["reason"] == "PromptFormatMismatch"

    job["status"]["artifacts"] = {"promptRenderings": [same]}
    isvc, jobs = parse(inferenceservice("bot", adapters=[{"name": "a", "fineTuneJobRef": {"name": "a"}}]), job)
    check = promptcheck.check(isvc, jobs, result, lambda p: adapters.HTTPServer(replicas["10.0.0.1"].url))
    assert check.mismatches == [] and check.checked == ["a: 1 example(s)"]
    status = status_for(isvc, [], rolled_out(1), pods, "rev-1", [], "2026-01-01T00:00:00Z", result, want,
                        None, check)
    assert status["phase"] == "Ready"
    assert {c["type"]: c for c in status["conditions"]}["PromptFormatMismatch"]["reason"] == "SameAsTraining"


def test_a_job_deploying_under_a_served_name_is_a_new_version_and_ends_not_promoted_when_refused():
    """spec.deploy.adapterName: the entry switches to the new job and keeps its promotion gate;
    the job is Deployed once promoted, Succeeded (NotPromoted) when refused."""
    from finetune_api.models import FineTuneJob
    from finetune_operator.serving import handlers
    from finetune_operator.status import Observation, Phase, deployment_observation

    v2 = FineTuneJob.from_resource(finetunejob("v2", uid="uid-v2", deploy={"inferenceService": "srv",
                                                                         "adapterName": "bot"}))
    spec = {"model": {"source": "x"}, "adapters": [{"name": "bot", "fineTuneJobRef": {"name": "v1"},
                                                    "promotion": {"margin": 0.1}},
                                                   {"name": "other", "fineTuneJobRef": {"name": "o"}}]}
    assert handlers._with_job(spec, v2, "srv")["adapters"] == [
        {"name": "bot", "fineTuneJobRef": {"name": "v2"}, "promotion": {"margin": 0.1}},
        {"name": "other", "fineTuneJobRef": {"name": "o"}}]
    assert handlers._new_isvc(v2, "srv")["spec"]["adapters"] == [{"name": "bot", "fineTuneJobRef": {"name": "v2"}}]

    endpoint = {"name": "srv", "url": "http://srv/v1"}
    obs = Observation(Phase.DEPLOYING, "x", "y")

    def isvc(promotions):
        return {"metadata": {"generation": 2}, "status": {"observedGeneration": 2, "phase": "Ready",
                                                          "servedModels": ["srv", "bot"], "promotions": promotions}}

    refused = [{"name": "bot", "fineTuneJob": "v1", "candidate": "v2", "result": "Refused",
                "message": "refused v2: evalLoss 3.0 for v2 against 2.0 for v1"}]
    out = deployment_observation(v2, obs, endpoint, isvc(refused))
    assert (out.phase, out.reason) == (Phase.SUCCEEDED, "NotPromoted") and "evalLoss 3.0" in out.message
    evaluating = [{"name": "bot", "fineTuneJob": "v1", "candidate": "v2", "result": "Evaluating"}]
    assert deployment_observation(v2, obs, endpoint, isvc(evaluating)).phase == Phase.DEPLOYING
    promoted = [{"name": "bot", "fineTuneJob": "v2", "result": "Promoted"}]
    out = deployment_observation(v2, obs, endpoint, isvc(promoted))
    assert (out.phase, out.reason) == (Phase.SUCCEEDED, "Deployed") and "as model 'bot'" in out.message
