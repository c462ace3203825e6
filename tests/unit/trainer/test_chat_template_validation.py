"""Chat templates at validation (issue 16): every chat record is rendered with the job's
template before any GPU time; what the template cannot render is an error with its line
number, and lengths are measured as rendered. `dataset.chatTemplate` picks the template.

The Llama-3.1-style model is the tiny model with Llama 3.1's special tokens and a template
written for the tests (tests/fixtures/llama31.py); no hub.
"""

from __future__ import annotations

import json
import shutil

import pytest

from finetune_api.models import ChatTemplate
from finetune_trainer.config import ConfigError, DatasetConfig, TrainerConfig
from finetune_trainer.data import inspect_dataset
from finetune_trainer.data.command import validate_cli
from tests.fixtures.llama31 import llama31_model  # noqa: F401 - a fixture
from tests.fixtures.ml import write_jsonl

PERMANENT = 42


@pytest.fixture(scope="module")
def tokenizer(llama31_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama31_model)


def chat(*turns: str, **extra) -> dict:
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)], **extra}


def call(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": {"x": 1}}}


def test_what_the_template_cannot_render_is_an_error_with_its_line(tmp_path, tokenizer):
    records = [
        chat("hello", "hi"),
        {"messages": [{"role": "user", "content": "two at once"},
                      {"role": "assistant", "content": "", "tool_calls": [call("a"), call("b")]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                   {"type": "image_url", "image_url": {"url": "x"}}]},
                      {"role": "assistant", "content": "a cat"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say "},
                                                   {"type": "text", "text": "yes"}]},
                      {"role": "assistant", "content": "yes"}]},
    ]
    cfg = DatasetConfig(source=str(write_jsonl(tmp_path / "d.jsonl", records)), format="chat",
                        eval_fraction=0.0, min_examples=1, max_invalid_fraction=0.0)

    report = inspect_dataset(cfg, seed=0, max_seq_length=512, tokenizer=tokenizer).report

    assert not report.usable
    assert report.rejected == 2
    assert report.first_errors == [
        "line 2: the chat template cannot render this conversation: This model only supports "
        "single tool-calls at once!",
        "line 3: messages[0].content[1]: content part 'image_url' is not supported (text parts only)",
    ]


def test_text_content_parts_are_joined_into_the_turn(tmp_path, tokenizer):
    records = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Say "},
                                                          {"type": "text", "text": "yes"}]},
                             {"role": "assistant", "content": "yes"}]}]
    cfg = DatasetConfig(source=str(write_jsonl(tmp_path / "d.jsonl", records)), format="chat",
                        eval_fraction=0.0, min_examples=1)

    prepared = inspect_dataset(cfg, seed=0, max_seq_length=512, tokenizer=tokenizer)

    assert prepared.train[0]["messages"][0] == {"role": "user", "content": "Say yes"}


STRICT = ("{%- for m in messages %}{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
          "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
          "{%- endif %}{{- '<|start_header_id|>' + m.role + '<|end_header_id|>' + m.content + '<|eot_id|>' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>' }}"
          "{%- endif %}")


def test_validate_data_renders_with_a_template_file_and_names_the_line(tmp_path, llama31_model, capsys):
    records = [chat("q", "a"), {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                                             {"role": "assistant", "content": "a"}]}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "strict.jinja").write_text(STRICT)
    common = [str(data), "--format", "chat", "--tokenizer", str(llama31_model), "--min-examples", "1",
              "--eval-fraction", "0", "--json"]

    assert validate_cli(common) == 0  # the model's own template renders both
    capsys.readouterr()
    assert validate_cli(common + ["--chat-template", str(tmp_path / "strict.jinja")]) == 2

    report = json.loads(capsys.readouterr().out)
    assert report["firstErrors"] == ["line 2: the chat template cannot render this conversation: "
                                "Conversation roles must alternate user/assistant/user/assistant"]
    assert validate_cli([str(data), "--format", "chat", "--chat-template", "chatml"]) == 2
    assert "--chat-template renders with a tokenizer" in capsys.readouterr().err


def test_a_base_model_without_a_template_fails_fast_and_permanently(trainer_config, tiny_model, tmp_path):
    """Data preparation, before the model is loaded, raises what the CLI turns into exit 42
    (test_trainer_cli.py checks the mapping in a subprocess)."""
    from finetune_trainer.cli import classify
    from finetune_trainer.data import DataValidationError
    from finetune_trainer.model import load_tokenizer
    from finetune_trainer.prepared import prepare_data

    base = tmp_path / "base-model"
    shutil.copytree(tiny_model, base)
    (base / "chat_template.jinja").unlink()
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    cfg = TrainerConfig.load(trainer_config(model={"source": str(base)}, dataset={"format": "chat"}))

    with pytest.raises(DataValidationError) as failed:
        prepare_data(cfg, load_tokenizer(cfg), is_main=True)

    assert classify(failed.value) == (PERMANENT, "DataValidationFailed")
    assert "the model has no chat template" in str(failed.value)
    assert "dataset.chatTemplate" in str(failed.value)


def test_lengths_count_what_the_template_adds_and_never_cut_an_end_of_turn(tmp_path, tokenizer):
    from finetune_trainer.chat_templates import ChatRenderer

    renderer = ChatRenderer(tokenizer)
    first, second = chat("Say hi", "hi there"), chat("Say hi", "hi there", "Say bye", "bye now")
    one_turn = renderer.count(first)
    words = len(tokenizer("Say hi hi there", add_special_tokens=False)["input_ids"])
    assert one_turn > words + 20  # BOS, headers and the date header: what was not counted
    data = write_jsonl(tmp_path / "d.jsonl", [second])

    def prepare(policy: str, max_len: int):
        cfg = DatasetConfig(source=str(data), format="chat", eval_fraction=0.0, min_examples=1,
                            length_policy=policy)
        return inspect_dataset(cfg, seed=0, max_seq_length=max_len, tokenizer=tokenizer)

    dropped = prepare("drop", renderer.count(second) - 1)
    assert dropped.report.dropped_too_long == 1 and dropped.train == []

    truncated = prepare("truncate", one_turn + 3)
    assert truncated.train == [first]  # whole turns: the first answer with its <|eot_id|>
    assert truncated.report.truncated == 1
    assert truncated.report.token_length_percentiles["max"] == one_turn

    cut = prepare("truncate", one_turn - 1)
    [record] = cut.train
    assert record["messages"][1]["content"] == "hi"
    rendered = renderer.render(record)
    assert len(rendered.input_ids) <= one_turn - 1
    assert rendered.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_named_templates_replace_the_models_own(tokenizer, tiny_model):
    from transformers import AutoTokenizer

    from finetune_trainer.chat_templates import select

    turns = chat("q", "a")["messages"]
    select(tokenizer, ChatTemplate(name="model"))
    assert tokenizer.apply_chat_template(turns, tokenize=False).startswith(
        "<|begin_of_text|><|start_header_id|>system")

    chatml = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    select(chatml, ChatTemplate(name="chatml"))
    assert chatml.apply_chat_template(turns, tokenize=False) == \
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"

    llama = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    llama.chat_template = None
    select(llama, ChatTemplate(name="llama-3.1"))
    assert llama.apply_chat_template(turns, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nq<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\na<|eot_id|>")

    # The tiny model's tokenizer has no <|eot_id|>: Llama's format cannot be learned with it.
    with pytest.raises(ConfigError, match=r"llama-3.1: the model's tokenizer has no <\|start_header_id\|>"):
        select(AutoTokenizer.from_pretrained(tiny_model), ChatTemplate(name="llama-3.1"))


def test_a_template_file_on_the_claim_is_the_tokenizers_template(tmp_path, llama31_model):
    from finetune_trainer.model import load_tokenizer

    root = tmp_path / "workspace"
    (root / "templates").mkdir(parents=True)
    (root / "templates" / "mine.jinja").write_text(STRICT)
    cfg = TrainerConfig.from_dict({
        "model": {"source": str(llama31_model)},
        "dataset": {"source": "pvc://claim/data/train.jsonl", "format": "chat",
                    "chatTemplate": {"file": "pvc://claim/templates/mine.jinja"}},
        "paths": {"root": str(root)},
    })

    assert load_tokenizer(cfg).chat_template == STRICT

    cfg.dataset.chat_template.file = "pvc://claim/templates/missing.jinja"
    with pytest.raises(ConfigError, match="dataset.chatTemplate.file pvc://claim/templates/missing.jinja"):
        load_tokenizer(cfg)


def test_the_comparison_serves_both_models_with_the_chosen_template(tmp_path):
    from finetune_trainer import compare
    from finetune_trainer.chat_templates import served_template
    from finetune_trainer.prepared import dataset_digest

    def config(chat_template: dict) -> TrainerConfig:
        return TrainerConfig.from_dict({"model": {"source": "m"}, "paths": {"root": str(tmp_path)},
                                        "dataset": {"source": "d.jsonl", "format": "chat",
                                                    "chatTemplate": chat_template}})

    artifact = tmp_path / "artifacts" / "chat_template.jinja"
    artifact.parent.mkdir()
    artifact.write_text(STRICT)
    (tmp_path / "t.jinja").write_text(STRICT)

    assert served_template(config({})) is None  # the model's own: vLLM finds it in the model
    assert served_template(config({"name": "chatml"})) == artifact
    assert served_template(config({"file": "volume://t.jinja"})) == artifact
    cmd = compare.server_command("/m", "base", 8000, adapter="/a", chat_template=artifact)
    assert cmd[cmd.index("--chat-template") + 1] == str(artifact)
    # The prepared dataset is keyed by the template file's content.
    before = dataset_digest(config({"file": "volume://t.jinja"}))
    (tmp_path / "t.jinja").write_text(STRICT + " ")
    assert dataset_digest(config({"file": "volume://t.jinja"})) != before
