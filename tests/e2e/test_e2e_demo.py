"""The main job, end to end: the same flow as `make demo`, asserted.

A real control plane, the operator running as the chart's ServiceAccount, the trainer pod
really running on the local node with the tiny model, vLLM's CPU build serving the adapter,
and the `openai` client asking it. vLLM listens on port 8000 of this machine (the local node
gives pods the host's network), so this test cannot run while `make demo` is up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from finetune_api.layout import job_folder
from finetune_devcluster.cluster import free_port
from finetune_devcluster.cluster import REPO_ROOT
from finetune_devcluster.demo import JOB, NAMESPACE, Demo
from tests.cluster.test_review_page import Answers, browse
from tests.fixtures.cluster import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def test_demo_fine_tunes_serves_and_answers_in_the_trained_direction(tmp_path, capsys):
    demo = Demo(tmp_path / "demo", metrics_port=free_port(), liveness_port=free_port(), openai_api_port=free_port(),
                timeout=900)
    try:
        result = demo.up()

        status = wait_for(lambda: (s := demo.job()["status"])["phase"] == "Succeeded" and s,
                          timeout=120, what="the FineTuneJob to be Succeeded once served")
        assert status["progress"]["step"] == status["progress"]["totalSteps"] > 0
        assert status["metrics"]["trainLoss"] > 0 and status["metrics"]["perplexity"] > 1
        assert status["dataset"]["trainExamples"] > 0 and status["dataset"]["contentHash"]
        assert status["inferenceService"]["name"] == JOB
        assert "Deployed" in {c["reason"] for c in status["conditions"]}
        # Issue 22: the table the demo printed is status.comparison, measured through vLLM.
        assert [r["model"] for r in result["comparison"]["rows"]] == ["base", "fine-tuned"]
        assert all(r["latencyP50Ms"] > 0 and r["outputTokensPerSecond"] > 0 for r in result["comparison"]["rows"])
        # ...and the demo job's review page, from the operator's port, in headless Chromium:
        # both answers for every prompt the comparison asked.
        page = f"http://127.0.0.1:{demo.metrics_port}/jobs/{NAMESPACE}/{JOB}/report"
        dom = browse(page, tmp_path / "chromium", "--dump-dom").stdout
        parsed = Answers()
        parsed.feed(dom)
        # (a tiny base model may answer nothing: a box for each side, and text in most)
        assert parsed.items and all({"base", "fine-tuned", "reference"} <= set(a) for a in parsed.items.values())
        assert sum(bool(a["fine-tuned"].strip()) for a in parsed.items.values()) >= len(parsed.items) // 2 + 1

        artifacts = demo.claim_path() / job_folder(JOB, shared_claim=True) / "artifacts"  # the demo's claim is shared
        assert (artifacts / "adapter" / "adapter_config.json").is_file()
        assert any((artifacts / "adapter").glob("adapter_model.*"))

        isvc = json.loads(demo.kubectl("get", "inferenceservice.finetune.dev", JOB, "-n", NAMESPACE,
                                       "-o", "json").stdout)
        assert isvc["status"]["phase"] == "Ready" and JOB in isvc["status"]["servedModels"]

        # Issue 21: the printed `export INFERENCE_URL=...` line reaches the demo's server from here.
        printed = capsys.readouterr().out
        sys.stdout.write(printed)
        exports = re.findall(r"^\s*export INFERENCE_URL=(http://\S+/v1)$", printed, re.M)
        assert exports, printed[-2000:]
        with urllib.request.urlopen(f"{exports[-1]}/models", timeout=30) as resp:
            assert JOB in {m["id"] for m in json.load(resp)["data"]}

        # The dataset teaches "Arr matey, <topic> be grand!"; the prompts are held out.
        answers = result["answers"]
        assert answers and all(a["fine-tuned"] for a in answers)
        assert any("matey" in a["fine-tuned"].lower() and "matey" not in a["base"].lower() for a in answers), answers

        # Done when: OpenAI's fine-tuning quick-start runs against the demo with only the
        # printed exports (base URL, key, base model) set.
        exports = demo.start_openai_api()
        assert set(exports) == {"OPENAI_BASE_URL", "OPENAI_API_KEY", "FINETUNE_BASE_MODEL"}
        quickstart = subprocess.run(
            [sys.executable, str(REPO_ROOT / "examples" / "openai_quickstart.py"),
             str(REPO_ROOT / "examples" / "data" / "openai-chat.jsonl")],
            env={**os.environ, **exports}, capture_output=True, text=True, timeout=900)
        assert quickstart.returncode == 0, quickstart.stdout + quickstart.stderr
        assert "finished: succeeded ft:tiny-llama:pirate:ftjob-" in quickstart.stdout, quickstart.stdout
        assert "answer:" in quickstart.stdout and "checkpoint " in quickstart.stdout
    finally:
        demo.stop()
