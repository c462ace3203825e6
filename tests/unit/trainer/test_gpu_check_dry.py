"""`make gpu-check-dry`: the GPU check's code path on CPU with the tiny model (no GPU here;
the same script on a GPU is `make gpu-check`). Its LoRA cases only, for the suite's time: its
FSDP cases (a sharded checkpoint, then a resume) are what test_fsdp_sharding.py runs, with a
SIGKILL in between."""

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
    docs.write_text(f"# Benchmarks\n\n{gpu_check.TABLE_HEADING}\n\nold figures\n\n## Later section\n\nkept\n")

    code = gpu_check.main(["--dry", "--out", str(out), "--docs", str(docs), "--work", str(tmp_path / "work"),
                           "--only", "lora-tiny-padded,lora-tiny-packed"])

    results = json.loads(out.read_text())
    cases = results["cases"]
    assert code == 0, json.dumps(cases, indent=1)[-3000:]
    for name in ("lora-tiny-padded", "lora-tiny-packed"):
        assert cases[name]["tokensPerSecond"] > 0 and cases[name]["peakMemoryBytes"] > 0, name
        assert any("mfu" in key for key in cases[name]), "an MFU entry per case (None on CPU: no peak)"
    assert cases["lora-tiny-packed"]["packing"] is True and cases["lora-tiny-padded"]["packing"] is False
    assert "merged" in cases["lora-tiny-padded"]["artifacts"]
    assert cases["full-tiny-fsdp"] == {"skipped": "not selected (--only)"}
    assert "CUDA" in cases["qlora-tiny-padded"]["skipped"]
    table = docs.read_text()
    assert gpu_check.TABLE_HEADING in table and "| lora-tiny-packed |" in table
    assert "old figures" not in table and table.rstrip().endswith("kept"), "its own section is replaced, no other"
