"""The chart's alert rules under the real promtool (built from the pinned Prometheus module
by hack/build-prometheus.sh): `promtool check rules` on the rendered PrometheusRule,
`promtool test rules` on tests/alerts/*.yaml, and `promtool check metrics` on what the
operator and a trainer export. (vLLM's /metrics is checked in
tests/e2e/test_dashboard_live_prometheus.py, which runs a real vLLM.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from finetune_devcluster.prometheus import prometheus_binaries, render_alert_rules

REPO_ROOT = Path(__file__).resolve().parents[3]
ALERT_TESTS = REPO_ROOT / "tests" / "alerts"


@pytest.fixture(scope="module")
def promtool() -> Path:
    return prometheus_binaries() / "promtool"


@pytest.fixture(scope="module")
def helm() -> Path:
    if os.environ.get("HELM"):
        return Path(os.environ["HELM"])
    from finetune_devcluster.cluster import control_plane_binaries

    return control_plane_binaries() / "helm"


@pytest.fixture()
def rendered_rules(helm, tmp_path) -> Path:
    return render_alert_rules(helm, tmp_path / "prometheus-rules.yaml")


def alert_names(rules_file: Path) -> list[str]:
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def test_rendered_prometheus_rule_passes_promtool_check_rules(promtool, rendered_rules):
    out = subprocess.run([str(promtool), "check", "rules", str(rendered_rules)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_names(rendered_rules))} rules found" in out.stdout


def test_rules_rendered_with_other_thresholds_pass_promtool_check_rules(promtool, helm, tmp_path):
    rules = render_alert_rules(helm, tmp_path / "custom.yaml", "metrics.prometheusRule.pendingMinutes=5",
                               "metrics.prometheusRule.noProgressMinutes=90",
                               "metrics.prometheusRule.severity=critical")
    out = subprocess.run([str(promtool), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[90m]" in rules.read_text() and "for: 5m" in rules.read_text()


def test_every_alert_has_a_firing_and_a_quiet_unit_test(rendered_rules):
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in sorted(ALERT_TESTS.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alert_names(rendered_rules))
    assert names, "the rendered rules hold no alerts"
    assert not names - firing, f"alerts with no firing test in tests/alerts: {sorted(names - firing)}"
    assert not names - quiet, f"alerts with no quiet test in tests/alerts: {sorted(names - quiet)}"
    assert not (firing | quiet) - names, f"tests of alerts that do not exist: {sorted((firing | quiet) - names)}"


def test_alert_unit_tests_pass_under_promtool_test_rules(promtool, rendered_rules, tmp_path):
    files = []
    for path in sorted(ALERT_TESTS.glob("*.yaml")):
        shutil.copy(path, tmp_path / path.name)
        files.append(path.name)
    assert len(files) >= 6
    out = subprocess.run([str(promtool), "test", "rules", *files], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(files), out.stdout


def test_promtool_test_rules_catches_a_wrong_expectation(promtool, rendered_rules, tmp_path):
    """The harness can fail: a test expecting the wrong severity is reported."""
    case = yaml.safe_load((ALERT_TESTS / "finetunejob-loss-nan.yaml").read_text())
    case["tests"][0]["alert_rule_test"][1]["exp_alerts"][0]["exp_labels"]["severity"] = "critical"
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(case))
    out = subprocess.run([str(promtool), "test", "rules", "wrong.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "FineTuneJobLossNaN" in out.stdout + out.stderr


def check_metrics(promtool: Path, exposition: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool), "check", "metrics"], input=exposition, capture_output=True, timeout=60)


def test_operator_metrics_pass_promtool_check_metrics(promtool):
    from prometheus_client import generate_latest

    from finetune_operator import metrics

    # Every family with a sample, as a running operator has.
    metrics.set_job_counts({"Training": 1}, ("Pending", "Training"))
    metrics.phase_transitions.labels(**{"from": "Pending", "to": "Validating"}).inc()
    metrics.reconcile_duration.observe(0.02)
    metrics.time_to_training_start.observe(12)
    metrics.job_duration.observe(300)
    metrics.gpu_seconds.inc(1800)
    exposition = generate_latest(metrics.registry)
    for name in metrics.METRIC_NAMES:
        assert name.encode() in exposition
    out = check_metrics(promtool, exposition)
    assert out.returncode == 0 and not out.stdout.strip(), (out.stdout + out.stderr).decode()


def test_trainer_metrics_pass_promtool_check_metrics(promtool):
    from finetune_trainer.reporting import Metrics, Progress

    m = Metrics(port=0)
    try:
        m.update(Progress(step=3, total_steps=10, epoch=0.3, train_loss=2.5, eval_loss=2.7,
                          learning_rate=1e-4, tokens_per_second=1234.5))
        port = m.server[0].server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            exposition = r.read()
    finally:
        m.close()
    assert b"finetune_trainer_loss 2.5" in exposition
    out = check_metrics(promtool, exposition)
    assert out.returncode == 0 and not out.stdout.strip(), (out.stdout + out.stderr).decode()


def test_promtool_check_metrics_flags_a_lint_problem(promtool):
    """The check can fail: a counter without the _total suffix is reported."""
    out = check_metrics(promtool, b"# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\n")
    assert out.returncode != 0 and b"bad_counter" in out.stdout + out.stderr
