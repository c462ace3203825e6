"""What the trainer records of how it rendered eval prompts (finetune_trainer.renderings),
with the tiny model's real tokenizer and chat template."""

from __future__ import annotations

import json

from finetune_trainer.renderings import prompt_renderings, write

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                     {"role": "assistant", "content": "Red."}]}
COMPLETION = {"prompt": "### Instruction:\nName a colour.\n\n### Response:\n", "completion": "Red."}


def test_the_prompt_part_is_the_start_of_the_conversation_training_tokenized(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    [chat, completion] = prompt_renderings(tok, [CHAT, {"text": "plain text has no prompt"}, COMPLETION])
    whole = tok(tok.apply_chat_template(CHAT["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
    assert chat["messages"] == CHAT["messages"][:2]
    assert chat["text"].endswith("<|im_start|>assistant\n")
    assert whole[:len(chat["tokenIds"])] == chat["tokenIds"] and len(whole) > len(chat["tokenIds"])
    assert completion == {"prompt": COMPLETION["prompt"], "text": COMPLETION["prompt"],
                          "tokenIds": tok(COMPLETION["prompt"])["input_ids"]}
    assert len(prompt_renderings(tok, [CHAT] * 5)) == 3
    path = write(tmp_path / "artifacts", [chat])
    assert json.loads(path.read_text()) == [chat] and path.name == "prompt_renderings.json"
