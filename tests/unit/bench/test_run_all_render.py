"""`bench/run_all.py --render-only` rewrites docs/benchmarks.md from bench/results/*.json. A section
whose numbers come from a hand-recorded file (the DPO check on a lent H200), or from a run that has
not happened yet (`make gpu-check` without a GPU), must survive a re-render: they were dropped
before, silently, whenever someone re-rendered the page."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def load_run_all():
    spec = importlib.util.spec_from_file_location("run_all_under_test", REPO / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_keeps_the_dpo_gpu_check_and_says_when_gpu_check_has_not_run(tmp_path, monkeypatch):
    run_all = load_run_all()
    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu_dpo_h200.json").write_text((REPO / "bench" / "results" / "gpu_dpo_h200.json").read_text())
    monkeypatch.setattr(run_all, "RESULTS", results)

    page = run_all.render("kept notes")
    assert "## DPO on a GPU" in page
    assert "| QLoRA (nf4) DPO | 0 | 26.1 | 0.875 -> 1.0 | 4.23 |" in page
    assert "| LoRA DPO | 0 | 18.4 | 0.875 -> 1.0 | 4.31 |" in page
    assert "Not measured yet" in page and "make gpu-check" in page
    assert page.rstrip().endswith("kept notes")


def test_render_shows_the_gpu_table_instead_once_gpu_check_has_run(tmp_path, monkeypatch):
    run_all = load_run_all()
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(run_all, "RESULTS", results)
    monkeypatch.setattr(run_all, "gpu_section", lambda data: ["## The trainer on one GPU", "", "TABLE", ""])
    (results / "gpu.json").write_text(json.dumps({"cases": {}}))

    page = run_all.render("")
    assert "TABLE" in page and "Not measured yet" not in page
