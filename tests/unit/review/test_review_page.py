"""The review page's HTML (finetune_api.review): self-contained, both answers per prompt,
user text escaped, forms only where the operator serves it (issue 22)."""

from __future__ import annotations

import json
import re

from finetune_api import review

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
JOB = {"metadata": {"name": "bot", "namespace": "ml",
                    "annotations": {review.VERDICTS_ANNOTATION: json.dumps(
                        {"answers": {"0": {"fine-tuned": {"style": "bad"}}}})}},
       "spec": {"model": {"source": "org/base"}, "method": {"type": "lora"}},
       "status": {"phase": "AwaitingApproval",
                  "dataset": {"trainExamples": 40, "warnings": ["few examples"]},
                  "comparison": {"state": "Measured", "message": "2 prompts",
                                 "rows": [{"model": "base", "exactMatch": 0.0, "latencyP50Ms": 41.5,
                                           "costPer1kOutputTokens": "0.0123"},
                                          {"model": "fine-tuned", "exactMatch": 1.0, "latencyP50Ms": 43.0,
                                           "costPer1kOutputTokens": "0.0125"}]}}}
COMPARISON = {"answers": [
    {"kind": "prompt", "prompt": "Describe a teapot.", "reference": "Arr", "base": "ire/FFF",
     "fineTuned": "Arr matey", "baseMs": 40.1, "fineTunedMs": 44.0},
    {"kind": "sample", "prompt": "<script>alert(1)</script>", "reference": None,
     "base": "a < b & c", "fineTuned": "\"quoted\"", "baseMs": 10, "fineTunedMs": 11},
]}


def test_every_prompt_shows_base_and_fine_tuned_answers_and_the_reference():
    page = review.render(JOB, COMPARISON, loss_png=PNG, actions="/jobs/ml/bot")
    items = re.findall(r'<div class="item" id="answer-(\d+)">(.*?)</div></div>(?=<fieldset|<div class="item"|<p>)',
                       page, flags=re.S)
    assert [i for i, _ in items] == ["0", "1"]
    first = page[page.index('id="answer-0"'):page.index('id="answer-1"')]
    assert "ire/FFF" in first and "Arr matey" in first and ">Arr<" in first
    assert 'class="answer base"' in first and 'class="answer fine-tuned"' in first


def test_the_page_is_self_contained_and_escapes_user_text():
    page = review.render(JOB, COMPARISON, loss_png=PNG, actions="/jobs/ml/bot")
    assert "<script" not in page  # the prompt's <script> is text, and the page has none
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &lt; b &amp; c" in page
    assert not re.search(r'(src|href)="(https?:)?//', page), "no external assets"
    assert 'src="data:image/png;base64,' in page


def test_table_dataset_and_recorded_verdicts_are_shown():
    page = review.render(JOB, COMPARISON, loss_png=PNG, actions="/jobs/ml/bot")
    table = page[page.index('<table id="comparison">'):page.index("</table>")]
    assert "Latency p50 (ms)" in table and "41.5" in table and "0.0125" in table
    assert "few examples" in page and "trainExamples" in page
    assert 'name="fine-tuned-0-style" value="bad" checked' in page
    for aspect in review.ASPECTS:
        assert f'name="base-1-{aspect}"' in page
    assert 'action="/jobs/ml/bot/verdicts"' in page and 'action="/jobs/ml/bot/approval"' in page
    assert 'name="token"' in page and 'value="true" id="approve"' in page


def test_the_file_on_the_volume_has_no_forms_and_says_how_to_approve():
    page = review.render(JOB, COMPARISON)
    assert "<form" not in page and "finetune.dev/approved=true" in page
    assert "No loss curve yet." in page


def test_verdict_form_fields_parse_into_answers_sides_and_aspects():
    form = {"base-0-factuality": "good", "fine-tuned-0-safety": "bad", "fine-tuned-12-style": "unsure",
            "base-0-mood": "good", "base-x-style": "good", "base-1-style": "great", "token": "t"}
    assert review.parse_verdicts(form) == {
        "0": {"base": {"factuality": "good"}, "fine-tuned": {"safety": "bad"}},
        "12": {"fine-tuned": {"style": "unsure"}}}
