"""Assistant-only loss with a Llama-3.1-style chat template (issue 16 item 4).

TRL 1.16 knows Llama 3.0's template but not 3.1's/3.2's, and the trainer used to fall back to
training on whole conversations: system and user turns, and the date header the template
injects. The template here (tests/fixtures/llama31.py) is written for the test, on the tiny
model's tokenizer with Llama 3.1's special tokens added; no hub.
"""

from __future__ import annotations

import pytest

from finetune_trainer.config import TrainerConfig
from finetune_trainer.model import Precision
from finetune_trainer.train import build_sft_config, data_kind, make_trainer
from tests.fixtures.llama31 import llama31_model  # noqa: F401 - a fixture

IGNORE = -100

CONVERSATION = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi"},
    {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "Say bye"},
    {"role": "assistant", "content": "bye now"},
]}


@pytest.fixture(scope="module")
def tokenizer(llama31_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama31_model)


@pytest.fixture(scope="module")
def model(llama31_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama31_model)


def labelled_rows(tmp_path, model_dir, model, tokenizer, records, chat_template=None):
    cfg = TrainerConfig.from_dict({
        "model": {"source": str(model_dir)},
        "method": {"type": "full"},
        "dataset": {"source": "unused.jsonl", "format": "chat"},
        "training": {"maxSeqLength": 512, "precision": "fp32", "perDeviceBatchSize": 2},
        "paths": {"root": str(tmp_path)},
    })
    args = build_sft_config(cfg, Precision("fp32", "fp32"), has_eval=False, kind=data_kind(records),
                            tokenizer=tokenizer, packing=False)
    from finetune_trainer.objectives.sft import make_sft_trainer

    trainer = make_sft_trainer(model, args, tokenizer, records, [], chat_template=chat_template)
    return [trainer.train_dataset[i] for i in range(len(records))]


def spans(tokenizer, row, trained: bool) -> list[str]:
    """The decoded runs of tokens that are (or are not) trained on."""
    out, run = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if (label != IGNORE) == trained:
            run.append(token)
        elif run:
            out.append(tokenizer.decode(run))
            run = []
    if run:
        out.append(tokenizer.decode(run))
    return out


def test_llama31_style_template_trains_only_assistant_turns_with_their_eot(
        tmp_path, llama31_model, model, tokenizer):
    from trl.chat_template_utils import get_training_chat_template

    with pytest.raises(ValueError):  # the premise: TRL cannot patch this template
        get_training_chat_template(tokenizer)

    [row] = labelled_rows(tmp_path, llama31_model, model, tokenizer, [CONVERSATION])

    assert spans(tokenizer, row, trained=True) == ["hi there<|eot_id|>", "bye now<|eot_id|>"]
    masked = "".join(spans(tokenizer, row, trained=False))
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024" in masked
    assert "You are terse." in masked and "Say hi" in masked and "Say bye" in masked
    assert masked.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # Labels are the input ids where trained: the last token trained is the final <|eot_id|>.
    trained_positions = [i for i, label in enumerate(row["labels"]) if label != IGNORE]
    last = trained_positions[-1]
    assert row["input_ids"][last] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert last == len(row["input_ids"]) - 1
    # The tokens are those of the template's own rendering.
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(
        CONVERSATION["messages"], tokenize=False)


def test_tool_call_turns_train_and_tool_results_do_not(tmp_path, llama31_model, model, tokenizer):
    record = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ], "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}]}

    [row] = labelled_rows(tmp_path, llama31_model, model, tokenizer, [record])

    assert spans(tokenizer, row, trained=True) == [
        '{"name": "weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is sunny.<|eot_id|>"]
    masked = "".join(spans(tokenizer, row, trained=False))
    assert "sunny<|eot_id|>" in masked and '"name": "weather"' in masked  # the tool list


def test_loss_on_all_trains_the_whole_rendering(tmp_path, llama31_model, model, tokenizer):
    from finetune_api.models import ChatTemplate

    [row] = labelled_rows(tmp_path, llama31_model, model, tokenizer, [CONVERSATION],
                          chat_template=ChatTemplate(loss_on="all"))

    assert all(label != IGNORE for label in row["labels"])
    assert "Say hi" in tokenizer.decode(row["labels"])


def test_a_template_that_rewrites_earlier_turns_gives_no_mask_and_an_error(tokenizer):
    """A template that renders the last assistant turn unlike earlier ones (as templates
    that drop past reasoning do) cannot be masked: an error, never a silent whole-sequence
    loss."""
    from finetune_trainer.chat_templates import ChatRenderer, TemplateError

    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{%- for m in messages %}{%- if m.role == 'assistant' and not loop.last %}"
        "{{- '<|eot_id|>' }}{%- else %}{{- m.role + ': ' + m.content + '<|eot_id|>' }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")

    with pytest.raises(TemplateError, match=r"messages\[2\]: the chat template renders"):
        ChatRenderer(tokenizer).render(CONVERSATION)
