"""The comparison's pure parts: what is asked, how answers are scored, the table, and what
a comparison that cannot reach vLLM reports (issue 22). The real server run is
tests/e2e/test_comparison_vllm.py."""

from __future__ import annotations

import json

import pytest

from finetune_trainer import compare
from finetune_trainer.compare import Answer, Item, ModelRun


def test_percentiles_interpolate_between_ranks():
    assert compare.percentile([], 50) is None
    assert compare.percentile([3.0], 95) == 3.0
    assert compare.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert compare.percentile([float(i) for i in range(1, 101)], 95) == pytest.approx(95.05)


@pytest.mark.parametrize("answer, reference, hit", [
    ("Arr matey, a teapot!", "arr", True),
    ("Hello there", "arr", False),
    ("order 42 shipped", "/[0-9]+ shipped/", True),
    ("order shipped", "/[0-9]+ shipped/", False),
    ("anything", "/[unclosed/", False),
])
def test_a_slash_delimited_reference_is_a_regex_any_other_a_substring(answer, reference, hit):
    assert compare.pattern_matches(answer, reference) is hit


def test_quality_scores_only_answers_with_a_reference_and_regexes_only_by_pattern():
    answers = ["red red", "blue", "no reference here", "code 7"]
    references = ["red red", "green", None, "/code [0-9]/"]
    q = compare.quality(answers, references, ["exactMatch", "bleu", "rouge"])
    assert q["exactMatch"] == 0.5          # of the two textual references
    assert q["patternMatch"] == 0.6667  # red red, code 7 (of three with a reference)
    assert set(q) == {"exactMatch", "bleu", "rougeL", "patternMatch"}
    assert "bleu" not in compare.quality(answers, references, [])


def test_speed_and_cost_come_from_the_same_requests():
    answers = [Answer("a", 0.5, 10), Answer("b", 1.5, 30)]
    s = compare.speed(answers, gpu_hour_price=3.6, gpus=1)
    assert s["latencyP50Ms"] == 1000.0 and s["latencyP95Ms"] == 1450.0
    assert s["outputTokensPerSecond"] == 20.0
    # 3.6 per hour = 0.001 per second; 1000 tokens take 50 s
    assert s["costPer1kOutputTokens"] == "0.050000"
    assert "costPer1kOutputTokens" not in compare.speed(answers, gpu_hour_price=0, gpus=1)


def test_table_has_base_then_fine_tuned_shaped_like_the_guides_table():
    items = [Item("prompt", prompt="p", reference="yes"), Item("sample", prompt="q", reference="no")]
    runs = {"base": ModelRun([Answer("maybe", 0.2, 4), Answer("no", 0.2, 4)], [2.0]),
            "fine-tuned": ModelRun([Answer("yes", 0.1, 4), Answer("no", 0.1, 4)], [1.0])}
    rows = compare.table_rows(items, runs, {"base": "base", "fine-tuned": "fine-tuned"},
                              metrics=["exactMatch"], gpu_hour_price=0, gpus=0)
    assert [r["model"] for r in rows] == ["base", "fine-tuned"]
    assert rows[0]["exactMatch"] == 0.5 and rows[1]["exactMatch"] == 1.0
    assert rows[0]["evalLoss"] == 2.0 and rows[1]["outputTokensPerSecond"] == 40.0
    text = compare.render_table(rows)
    assert text.splitlines()[0].split()[:3] == ["model", "exact", "match"]
    assert "fine-tuned" in text.splitlines()[2]


def test_items_are_the_prompts_then_a_seeded_sample_of_the_eval_split(trainer_config):
    from finetune_trainer.config import TrainerConfig

    cfg = TrainerConfig.load(trainer_config(evaluation={"prompts": [{"prompt": "Say hi", "reference": "hi"}]}))
    records = [{"prompt": f"### Instruction:\nq{i}\n\n### Response:\n", "completion": f"a{i}"} for i in range(20)]
    items = compare.items_for(cfg, records, sample_size=3, seed=0)
    assert [i.kind for i in items] == ["prompt", "sample", "sample", "sample"]
    assert items[0].prompt.startswith("### Instruction:\nSay hi") and items[0].shown == "Say hi"
    assert items[1:] == compare.items_for(cfg, records, sample_size=3, seed=0)[1:]
    assert compare.items_for(cfg, records, sample_size=0, seed=0)[1:] == []


def test_lora_rank_limit_is_a_value_vllm_accepts():
    assert compare.lora_rank_limit(8) == 8
    assert compare.lora_rank_limit(12) == 16
    assert compare.lora_rank_limit(600) == 512


def test_server_command_is_a_list_with_the_adapter_as_a_lora_module():
    cmd = compare.server_command("/m", "base", 8000, adapter="/ws/artifacts/adapter", lora_rank=8,
                                 max_model_len=192)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--lora-modules") + 1] == "fine-tuned=/ws/artifacts/adapter"
    assert cmd[cmd.index("--max-model-len") + 1] == "192"


def test_without_vllm_the_comparison_is_unavailable_with_the_reason_and_exit_0(trainer_config, monkeypatch):
    """vLLM is made unimportable for this process (the real server run is the e2e test)."""
    from finetune_trainer.config import TrainerConfig

    cfg = TrainerConfig.load(trainer_config(evaluation={"prompts": [{"prompt": "Say hi"}]}))
    adapter = cfg.paths.artifacts / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    real_find_spec = compare.importlib.util.find_spec
    monkeypatch.setattr(compare.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    summary = compare.run(cfg)
    assert summary["reason"] == "ComparisonUnavailable"
    report = json.loads((cfg.paths.artifacts / "comparison.json").read_text())
    assert report["state"] == "Unavailable" and "vLLM is not installed" in report["message"]
    status = compare.comparison_status(report, "/workspace/artifacts/comparison.json")
    assert status["prompts"] == 1 and "rows" not in status
