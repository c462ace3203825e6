"""Check one raw record against a dataset format and turn it into a TRL SFTTrainer record.

instruction -> {"prompt", "completion"} (prompt built with INSTRUCTION_TEMPLATE)
completion  -> {"prompt", "completion"}
chat        -> {"messages": [{"role", "content"}, ...]}
text        -> {"text"}

A field map renames source keys (top level and inside chat messages) and, for chat,
role values: {"conversations": "messages", "from": "role", "value": "content",
"human": "user", "gpt": "assistant"} reads ShareGPT data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Keys of a chat message that TRL and chat templates understand; others are dropped.
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
# Records bigger than this are rejected: they are almost always a broken export.
MAX_RECORD_BYTES = 1_000_000

# What each format turns into; formats of the same kind can be mixed in one dataset.
OUTPUT_KIND = {
    "instruction": "prompt-completion",
    "completion": "prompt-completion",
    "chat": "messages",
    "text": "text",
}


class RecordError(ValueError):
    """A record that cannot be used; the message names the field."""


@dataclass(slots=True)
class Example:
    """One converted record and what the cleaning steps need to know about it."""

    where: str  # "line 41", "record 3", "row 7"
    record: dict[str, Any]  # the SFTTrainer record
    dedup_text: str  # the record's own text (no template), for duplicate detection
    category: str | None = None
    tokens: int = 0  # length after the length policy


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _string(record: dict, name: str, fmt: str, *, required: bool = True,
            allow_empty: bool = False) -> str:
    if name not in record or (record[name] is None and not required):
        if required:
            raise RecordError(f'field "{name}" is missing (format: {fmt})')
        return ""
    value = record[name]
    if not isinstance(value, str):
        raise RecordError(f'field "{name}" must be a string, got {_type_name(value)}')
    if not allow_empty and not value.strip():
        raise RecordError(f'field "{name}" is an empty string (format: {fmt})')
    return value


def apply_field_map(record: dict, field_map: dict[str, str]) -> dict:
    if not field_map:
        return record
    return {field_map.get(k, k): v for k, v in record.items()}


def _instruction(record: dict) -> tuple[dict, str]:
    instruction = _string(record, "instruction", "instruction")
    input_ = _string(record, "input", "instruction", required=False, allow_empty=True)
    output = _string(record, "output", "instruction")
    if input_.strip():
        prompt = INSTRUCTION_WITH_INPUT_TEMPLATE.format(instruction=instruction, input=input_)
    else:
        prompt = INSTRUCTION_TEMPLATE.format(instruction=instruction)
    return {"prompt": prompt, "completion": output}, f"{instruction}\n{input_}\n{output}"


def _completion(record: dict) -> tuple[dict, str]:
    # An empty prompt is allowed: the whole completion is then trained on.
    prompt = _string(record, "prompt", "completion", allow_empty=True)
    completion = _string(record, "completion", "completion")
    return {"prompt": prompt, "completion": completion}, f"{prompt}\n{completion}"


def _text(record: dict) -> tuple[dict, str]:
    text = _string(record, "text", "text")
    return {"text": text}, text


def _chat(record: dict, field_map: dict[str, str]) -> tuple[dict, str]:
    if "messages" not in record:
        hint = ""
        if "conversations" in record:
            hint = " (ShareGPT data? map it: conversations=messages from=role value=content human=user gpt=assistant)"
        raise RecordError(f'field "messages" is missing (format: chat){hint}')
    messages = record["messages"]
    if not isinstance(messages, list):
        raise RecordError(f'field "messages" must be a list, got {_type_name(messages)}')
    if not messages:
        raise RecordError('field "messages" is an empty list (format: chat)')
    out: list[dict] = []
    texts: list[str] = []
    for i, raw in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise RecordError(f"{where} must be an object, got {_type_name(raw)}")
        message = apply_field_map(raw, field_map)
        role = message.get("role")
        if role is None:
            raise RecordError(f'{where}: field "role" is missing (format: chat)')
        if isinstance(role, str):
            role = field_map.get(role, role)
        if role not in CHAT_ROLES:
            raise RecordError(
                f"{where}.role {role!r} is not one of {', '.join(CHAT_ROLES)}"
                " (rename roles with the field map, e.g. gpt=assistant)"
            )
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls") and not content:
            content = ""  # an assistant turn that only calls tools
        elif content is None and "content" not in message:
            raise RecordError(f'{where}: field "content" is missing (format: chat)')
        elif not isinstance(content, str):
            raise RecordError(f"{where}.content must be a string, got {_type_name(content)}")
        elif not content.strip():
            raise RecordError(f"{where}.content is an empty string")
        converted = {k: message[k] for k in MESSAGE_KEYS[2:] if message.get(k) is not None}
        out.append({"role": role, "content": content, **converted})
        texts.append(content)
    if out[-1]["role"] != "assistant":
        raise RecordError(
            f"the last message is from {out[-1]['role']!r}, not 'assistant': nothing to learn from"
        )
    converted_record: dict[str, Any] = {"messages": out}
    if isinstance(record.get("tools"), list):
        converted_record["tools"] = record["tools"]
    return converted_record, "\n".join(texts)


def record_size(record: dict) -> int:
    """Rough size in bytes of the strings in a record (UTF-8 of ASCII-ish text)."""
    size = 0
    stack: list[Any] = [record]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return size


def convert(raw: Any, fmt: str, field_map: dict[str, str], where: str,
            category_field: str | None = None, *, parse_json_strings: bool = False) -> Example:
    """Validate `raw` against `fmt`; raise RecordError naming the problem."""
    if not isinstance(raw, dict):
        raise RecordError(f"expected a JSON object, got {_type_name(raw)}")
    record = apply_field_map(raw, field_map)
    if parse_json_strings and fmt == "chat" and isinstance(record.get("messages"), str):
        import json  # CSV cells hold the messages list as JSON text

        try:
            record["messages"] = json.loads(record["messages"])
        except json.JSONDecodeError as exc:
            raise RecordError(f'field "messages" is not a JSON list: {exc.msg} at column {exc.colno}')
    if fmt == "instruction":
        converted, dedup_text = _instruction(record)
    elif fmt == "completion":
        converted, dedup_text = _completion(record)
    elif fmt == "chat":
        converted, dedup_text = _chat(record, field_map)
    elif fmt == "text":
        converted, dedup_text = _text(record)
    else:
        raise ValueError(f"unknown dataset format {fmt!r}")
    size = record_size(converted)
    if size > MAX_RECORD_BYTES:
        raise RecordError(
            f"record is {size / 1e6:.1f} MB, over the {MAX_RECORD_BYTES / 1e6:g} MB limit per record"
        )
    category = None
    if category_field:
        value = record.get(category_field)
        category = "(missing)" if value is None else str(value)
    return Example(where, converted, dedup_text, category)
