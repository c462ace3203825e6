"""Prometheus and promtool for the tests: the pinned binaries, the chart's alert rules as a
plain rules file, and a Prometheus server on this machine.

There is no Prometheus Operator in the dev cluster, so the server is given static scrape
targets (ports on this machine) instead of the chart's ServiceMonitor and PodMonitors; the
relabelling those do (the `finetunejob` / `inferenceservice` target labels) is reproduced
with static labels.

This is development tooling: the operator never imports it.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-prometheus.sh"
CHART = REPO_ROOT / "charts" / "finetune-operator"


class PrometheusError(RuntimeError):
    """Building, starting or querying Prometheus failed; the message says which and why."""


def prometheus_binaries() -> Path:
    """Build (or find in the cache) prometheus and promtool; returns their directory."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise PrometheusError(f"building prometheus failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _kube_version() -> str:
    versions = dict(line.split("=", 1) for line in (REPO_ROOT / "hack" / "versions.env").read_text().splitlines()
                    if line and not line.startswith("#"))
    return versions["KUBERNETES_VERSION"].split()[0]


def render_alert_rules(helm: Path, dest: Path, *values: str) -> Path:
    """The chart's PrometheusRule, rendered by helm with `values` (`key=value`), written to
    `dest` as a plain Prometheus rules file (its `spec`)."""
    sets = ["metrics.prometheusRule.enabled=true", "metrics.prometheusRule.force=true", *values]
    cmd = [str(helm), "template", "finetune-operator", str(CHART), "-n", "finetune-system",
           "--kube-version", _kube_version(), "--show-only", "templates/prometheusrule.yaml"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise PrometheusError(f"helm template failed:\n{out.stderr}")
    rule = yaml.safe_load(out.stdout)
    dest.write_text(yaml.safe_dump(rule["spec"], sort_keys=False, width=1000))
    return dest


@dataclass
class ScrapeTarget:
    """One static target: `address` is host:port on this machine."""

    job: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"


def scrape_config(targets: list[ScrapeTarget], interval: str = "2s", rule_files: list[str] = ()) -> dict:
    jobs: dict[tuple[str, str], dict] = {}
    for t in targets:
        job = jobs.setdefault((t.job, t.metrics_path), {
            "job_name": t.job, "metrics_path": t.metrics_path, "scrape_interval": interval,
            "static_configs": []})
        job["static_configs"].append({"targets": [t.address], "labels": dict(t.labels)})
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": list(rule_files), "scrape_configs": list(jobs.values())}


class Prometheus:
    """A Prometheus server on 127.0.0.1:`port` with its data in `workdir`."""

    def __init__(self, binaries: Path, workdir: Path, port: int):
        self.binaries, self.workdir, self.port = binaries, workdir, port
        self.url = f"http://127.0.0.1:{port}"
        self.config_file = workdir / "prometheus.yml"
        self.log_file = workdir / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def start(self, config: dict, timeout: float = 60) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        check = subprocess.run([str(self.binaries / "promtool"), "check", "config", str(self.config_file)],
                               capture_output=True, text=True, timeout=60)
        if check.returncode != 0:
            raise PrometheusError(f"promtool check config: {check.stdout}{check.stderr}")
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                [str(self.binaries / "prometheus"), f"--config.file={self.config_file}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.process.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout}s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-30:])
        except FileNotFoundError:
            return "(no log)"

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            raise PrometheusError(f"{path} {params}: {exc.code} {exc.read().decode(errors='replace')}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
