"""The review page in a real headless Chromium, served by the operator from the real API
server (issue 22).

The trainer and comparison pods run on fake kwok GPU nodes (a stand-in for a GPU), so what
the comparison Job would report is published here with the job's own trainer
ServiceAccount token, through the same code the comparison Job runs
(`finetune_trainer.compare.publish_review` and the status patcher): that also proves the
trainer's Role may write the review ConfigMap. The answers themselves are fixed text; the
real measurement through vLLM is tests/e2e/test_operator_realrun.py.

The screenshot goes to the test's folder (docs/img/review-page.png with UPDATE_RESULTS=1).
"""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from finetune_api.trainer_config import TrainerConfig
from tests.cluster.test_approval_gate import gated
from tests.cluster.test_operator_lifecycle import apply, status, wait_phase
from tests.fixtures.cluster import get_json, wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "img" / "review-page.png"
ANSWERS = [
    {"kind": "prompt", "prompt": "Describe a teapot.", "reference": "Arr", "base": "ire/FFFFFFFFFF",
     "fineTuned": "Arr matey, the matey,", "baseMs": 41.2, "fineTunedMs": 44.9},
    {"kind": "prompt", "prompt": "Where is the treasure?", "reference": "/[Aa]rr/",
     "base": "the the the", "fineTuned": "Arr, under the sand", "baseMs": 39.0, "fineTunedMs": 43.1},
    {"kind": "sample", "prompt": "Repeat the word red 2 times.", "reference": "red red",
     "base": "<b>blue</b>", "fineTuned": "red red", "baseMs": 38.5, "fineTunedMs": 40.2},
]
ROWS = [{"model": "base", "servedAs": "base", "exactMatch": 0.0, "patternMatch": 0.0, "rougeL": 0.05,
         "evalLoss": 6.21, "latencyP50Ms": 39.0, "latencyP95Ms": 41.0, "outputTokensPerSecond": 108.0},
        {"model": "fine-tuned", "servedAs": "fine-tuned", "exactMatch": 0.3333, "patternMatch": 1.0,
         "rougeL": 0.61, "evalLoss": 2.4, "latencyP50Ms": 43.1, "latencyP95Ms": 44.8,
         "outputTokensPerSecond": 96.5}]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium package is missing: run `bash hack/install-chromium.sh` (make install does)"
    return found


def browse(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium. Its --dump-dom and --screenshot need the browser's own JavaScript
    (with --blink-settings=scriptEnabled=false they print and write nothing), so "readable
    without JavaScript" is checked as: the page has no script and its Content-Security-Policy
    forbids any."""
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=120, check=True)


class Answers(html.parser.HTMLParser):
    """Text of each answer box, by answer item and side, as Chromium rendered the DOM."""

    def __init__(self):
        super().__init__()
        self.items: dict[str, dict[str, str]] = {}
        self._item = self._side = None
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and (attrs.get("id") or "").startswith("answer-"):
            self._item = attrs["id"]
            self.items[self._item] = {}
        classes = (attrs.get("class") or "").split()
        if tag == "div" and "answer" in classes and self._item:
            self._side = classes[-1]
            self.items[self._item][self._side] = ""
        if tag == "h4":
            self._depth += 1

    def handle_endtag(self, tag):
        if tag == "h4":
            self._depth -= 1
        elif tag == "div" and self._side:
            self._side = None

    def handle_data(self, data):
        if self._side and not self._depth:
            self.items[self._item][self._side] += data


def token_for(cluster, namespace: str, service_account: str) -> str:
    return cluster.kubectl("create", "token", service_account, "-n", namespace).stdout.strip()


def as_service_account(cluster, token: str):
    from kubernetes import config

    from finetune_trainer.reporting import _ApiTarget

    conf = config.new_client_from_config(config_file=str(cluster.kubeconfig)).configuration
    return _ApiTarget(conf.host.rstrip("/"), token, ssl.create_default_context(cafile=conf.ssl_ca_cert))


def publish_as_the_comparison_job(cluster, namespace: str, name: str, tmp_path: Path) -> None:
    from finetune_trainer import compare
    from finetune_trainer.config import JobRef
    from finetune_trainer.plots import write_loss_plot
    from finetune_trainer.reporting import StatusPatcher

    target = as_service_account(cluster, token_for(cluster, namespace, f"{name}-trainer"))
    cfg = TrainerConfig.from_dict({"model": {"source": "org/tiny"}, "dataset": {"source": "/d.jsonl"},
                                   "job": {"name": name, "namespace": namespace},
                                   "reporting": {"reviewConfigMap": f"{name}-review"}})
    plot = write_loss_plot([{"step": s, "loss": 4.0 / s, "learning_rate": 1e-3} for s in range(1, 13)]
                           + [{"step": 12, "eval_loss": 0.6}], tmp_path / "loss.png", f"{namespace}/{name}")
    report = {"state": "Measured", "message": "2 prompts and 1 eval records asked of both models",
              "prompts": 2, "samples": 1, "rows": ROWS, "answers": ANSWERS}
    material = {"comparison.json": json.dumps(report), "loss.png": plot.read_bytes(),
                "dataset.json": json.dumps({"examplesRead": 48, "trainExamples": 43, "evalExamples": 5,
                                            "warnings": ["only 43 training examples"]})}
    assert compare.publish_review(cfg, material, target)
    status_report = compare.comparison_status(report, "/workspace/artifacts/comparison.json")
    assert StatusPatcher(JobRef(name=name, namespace=namespace), 0, target).patch(
        {"status": {"comparison": status_report}})


def post(url: str, form: dict, token: str | None = None) -> tuple[int, str]:
    body = urllib.parse.urlencode({**form, **({"token": token} if token else {})}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as resp:
            return resp.status, resp.geturl()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_review_page_shows_both_answers_in_chromium_and_records_verdicts_and_approval(
        cluster, namespace, operator, tmp_path):
    name = "review"
    apply(cluster, namespace, gated(name))
    wait_phase(cluster, namespace, name, "AwaitingApproval", timeout=120)
    publish_as_the_comparison_job(cluster, namespace, name, tmp_path)
    wait_for(lambda: {c["type"]: c for c in status(cluster, namespace, name)["conditions"]}["Compared"]["status"]
             == "True", timeout=30, what="the Compared condition to follow status.comparison")

    url = f"http://127.0.0.1:{operator.metrics_port}/jobs/{namespace}/{name}/report"
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    profile = tmp_path / "chromium"
    dom = browse(url, profile, "--dump-dom").stdout
    assert "<script" not in dom, "the page reads without JavaScript: it has none"
    parsed = Answers()
    parsed.feed(dom)
    assert len(parsed.items) == len(ANSWERS)
    for i, expected in enumerate(ANSWERS):
        shown = parsed.items[f"answer-{i}"]
        assert shown["base"].strip() == expected["base"]
        assert shown["fine-tuned"].strip() == expected["fineTuned"]
        assert shown["reference"].strip() == expected["reference"]
    assert "Latency p95 (ms)" in dom and "96.5" in dom
    assert 'src="data:image/png;base64,' in dom
    assert "only 43 training examples" in dom

    # The tracked screenshot is rewritten only on request (UPDATE_RESULTS=1): a run leaves the
    # checkout clean.
    screenshot = SCREENSHOT if os.environ.get("UPDATE_RESULTS") else profile.parent / SCREENSHOT.name
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    browse(url, profile, f"--screenshot={screenshot}", "--window-size=1280,2200")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Recording needs a token whose user may update the job.
    verdicts = f"http://127.0.0.1:{operator.metrics_port}/jobs/{namespace}/{name}/verdicts"
    form = {"fine-tuned-0-style": "good", "base-0-factuality": "bad", "fine-tuned-2-safety": "good"}
    assert post(verdicts, form)[0] == 401
    assert post(verdicts, form, "not-a-token")[0] == 401
    code, message = post(verdicts, form, token_for(cluster, namespace, f"{name}-trainer"))
    assert code == 403 and "may not update" in message
    cluster.kubectl("create", "serviceaccount", "reviewer", "-n", namespace)
    cluster.kubectl("create", "role", "ftj-reviewer", "-n", namespace, "--verb=get,update",
                    "--resource=finetunejobs.finetune.dev")
    cluster.kubectl("create", "rolebinding", "ftj-reviewer", "-n", namespace, "--role=ftj-reviewer",
                    f"--serviceaccount={namespace}:reviewer")
    reviewer = token_for(cluster, namespace, "reviewer")
    code, landed = post(verdicts, form, reviewer)
    assert code == 200 and landed.endswith(f"/jobs/{namespace}/{name}/report")  # after the 303
    annotations = get_json(cluster, "ftj", name, "-n", namespace)["metadata"]["annotations"]
    recorded = json.loads(annotations["finetune.dev/review-verdicts"])
    assert recorded["answers"] == {"0": {"fine-tuned": {"style": "good"}, "base": {"factuality": "bad"}},
                                   "2": {"fine-tuned": {"safety": "good"}}}
    assert recorded["by"] == f"system:serviceaccount:{namespace}:reviewer"
    assert 'name="fine-tuned-0-style" value="good" checked' in browse(url, profile, "--dump-dom").stdout

    # The approve button: the annotation the gate waits for.
    approval = f"http://127.0.0.1:{operator.metrics_port}/jobs/{namespace}/{name}/approval"
    assert post(approval, {"approved": "true", "reason": "pirate enough"}, reviewer)[0] == 200
    annotations = get_json(cluster, "ftj", name, "-n", namespace)["metadata"]["annotations"]
    assert annotations["finetune.dev/approved"] == "true"
    assert "pirate enough" in annotations["finetune.dev/approval-reason"]
    wait_phase(cluster, namespace, name, "Succeeded", timeout=180, reason="Deployed")
