"""`make gpu-check-dry`: the GPU check's code path on CPU with the tiny model (no GPU here;
the same script on a GPU is `make gpu-check`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


def test_gpu_check_dry_run_trains_resumes_merges_and_reports_every_case(tmp_path, tiny_model):
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    out, docs = tmp_path / "gpu-dry.json", tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Later section\n\nkept\n")

    code = gpu_check.main(["--dry", "--out", str(out), "--docs", str(docs), "--work", str(tmp_path / "work")])

    results = json.loads(out.read_text())
    cases = results["cases"]
    assert code == 0, json.dumps(cases, indent=1)[-3000:]
    for name in ("lora-tiny-padded", "lora-tiny-packed", "full-tiny-fsdp", "full-tiny-fsdp-resumed"):
        assert cases[name]["tokensPerSecond"] > 0 and cases[name]["peakMemoryBytes"] > 0, name
        assert any("mfu" in key for key in cases[name]), "an MFU entry per case (None on CPU: no peak)"
    assert cases["lora-tiny-packed"]["packing"] is True and cases["lora-tiny-padded"]["packing"] is False
    assert "merged" in cases["lora-tiny-padded"]["artifacts"]
    assert cases["full-tiny-fsdp-resumed"]["resumedFrom"] == "checkpoint-2"
    assert cases["full-tiny-fsdp-resumed"]["step"] == 3
    assert "CUDA" in cases["qlora-tiny-padded"]["skipped"]
    table = docs.read_text()
    assert gpu_check.TABLE_HEADING in table and "| full-tiny-fsdp-resumed |" in table
    assert table.rstrip().endswith("kept"), "the other sections stay"
