"""How training rendered prompts, recorded for the serving side's check (issue 21).

The first eval examples' prompt parts, as the trainer turned them into tokens: a chat's
(and, with a chat template, an instruction or completion record's) turns before the answer through the tokenizer's chat template (with the generation prompt,
no extra special tokens, as TRL tokenizes conversations), a prompt/completion record's
prompt with the tokenizer's special tokens (as TRL tokenizes prompts). They go to
`artifacts/prompt_renderings.json` and `status.artifacts.promptRenderings`; an
InferenceService serving the adapter asks vLLM's `/tokenize` for the same conversations and
reports `PromptFormatMismatch` where the token ids differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "prompt_renderings.json"
EXAMPLES = 3
MAX_TOKENS = 1024
MAX_CHARS = 4096


def prompt_renderings(tokenizer, records: list[dict], n: int = EXAMPLES) -> list[dict[str, Any]]:
    out = []
    for record in records:
        entry = _rendering(tokenizer, record)
        if entry is not None and len(entry["tokenIds"]) <= MAX_TOKENS and len(entry["text"]) <= 4 * MAX_CHARS:
            out.append(entry)
        if len(out) == n:
            break
    return out


def _rendering(tokenizer, record: dict) -> dict[str, Any] | None:
    messages = record.get("messages")
    if isinstance(messages, list) and len(messages) >= 2 and messages[-1].get("role") == "assistant":
        if not getattr(tokenizer, "chat_template", None):
            return None
        turns = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in messages[:-1]]
        if any(len(t["content"]) > MAX_CHARS for t in turns):
            return None
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"messages": turns, "text": text, "tokenIds": [int(i) for i in ids]}
    prompt = record.get("prompt")
    if isinstance(prompt, str) and isinstance(record.get("completion"), str) and len(prompt) <= 2 * MAX_CHARS:
        ids = tokenizer(prompt)["input_ids"]
        return {"prompt": prompt, "text": prompt, "tokenIds": [int(i) for i in ids]}
    return None


def write(artifacts: Path, renderings: list[dict[str, Any]]) -> Path:
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / FILE
    path.write_text(json.dumps(renderings, indent=1))
    return path
