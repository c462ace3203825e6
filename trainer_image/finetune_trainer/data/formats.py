"""Check one raw record against a dataset format and turn it into a TRL SFTTrainer record.

instruction -> {"messages": [user, assistant]} when the model has a chat template (the
               user turn is the instruction, and its input after a blank line), else
               {"prompt", "completion"} with the Alpaca prompt (INSTRUCTION_TEMPLATE)
completion  -> {"messages": [user, assistant]} with a chat template, else {"prompt", "completion"}
               (finetune_api.prompts says which prompt format a job trains with)
chat        -> {"messages": [{"role", "content"}, ...]}
text        -> {"text"}
preference  -> {"prompt", "chosen", "rejected"} (TRL's DPOTrainer records): strings, or, when
               the prompt is a list of chat messages (or the record is OpenAI's DPO shape),
               conversational: prompt a message list, chosen/rejected assistant message lists

A field map renames source keys (top level and inside chat messages) and, for chat,
role values: {"conversations": "messages", "from": "role", "value": "content",
"human": "user", "gpt": "assistant"} reads ShareGPT data.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Any, Callable

from finetune_api.prompts import (INSTRUCTION_TEMPLATE, INSTRUCTION_WITH_INPUT_TEMPLATE,  # noqa: F401 - re-exported
                                  alpaca_prompt, completion_conversation, instruction_conversation)

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
    "preference": "preference",
}


def output_kind(fmt: str, chat_template: bool) -> str:
    """What records of `fmt` turn into; with a chat template, instruction and completion
    records are conversations."""
    if chat_template and fmt in ("instruction", "completion"):
        return "messages"
    return OUTPUT_KIND[fmt]


class RecordError(ValueError):
    """A record that cannot be used; the message names the field."""


@dataclass(slots=True)
class Example:
    """One converted record and what the cleaning steps need to know about it."""

    where: str  # "line 41", "record 3", "row 7"
    record: dict[str, Any]  # the SFTTrainer record
    dedup_text: str  # the record's own text (no template), for exact duplicate detection
    category: str | None = None
    tokens: int = 0  # length after the length policy
    # What the model learns from, for near-duplicate detection: the text without system
    # messages (None: dedup_text). 200 distinct conversations sharing one long system prompt
    # were near-duplicates of each other (issue 16 item 8).
    near_text: str | None = None
    # Its length as the chat template renders it (headers, BOS/EOS, tools), when rendered.
    rendered_tokens: int | None = None

    @property
    def similarity_text(self) -> str:
        return self.dedup_text if self.near_text is None else self.near_text


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


def _instruction(record: dict, chat: bool = False) -> tuple[dict, str]:
    instruction = _string(record, "instruction", "instruction")
    input_ = _string(record, "input", "instruction", required=False, allow_empty=True)
    output = _string(record, "output", "instruction")
    text = f"{instruction}\n{input_}\n{output}"
    if chat:
        return {"messages": instruction_conversation(instruction, input_, output)}, text
    return {"prompt": alpaca_prompt(instruction, input_), "completion": output}, text


def _completion(record: dict, chat: bool = False) -> tuple[dict, str]:
    # An empty prompt is allowed: the whole completion is then trained on (with a chat
    # template, after an empty user turn).
    prompt = _string(record, "prompt", "completion", allow_empty=True)
    completion = _string(record, "completion", "completion")
    if chat:
        return {"messages": completion_conversation(prompt, completion)}, f"{prompt}\n{completion}"
    return {"prompt": prompt, "completion": completion}, f"{prompt}\n{completion}"


def _text(record: dict) -> tuple[dict, str]:
    text = _string(record, "text", "text")
    return {"text": text}, text


def _messages(messages: Any, field_map: dict[str, str], name: str,
              fmt: str) -> tuple[list[dict], list[str]]:
    """Validate a list of chat messages (the field `name`); return them and their texts."""
    if not isinstance(messages, list):
        raise RecordError(f'field "{name}" must be a list, got {_type_name(messages)}')
    if not messages:
        raise RecordError(f'field "{name}" is an empty list (format: {fmt})')
    out: list[dict] = []
    texts: list[str] = []
    for i, raw in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(raw, dict):
            raise RecordError(f"{where} must be an object, got {_type_name(raw)}")
        message = apply_field_map(raw, field_map)
        role = message.get("role")
        if role is None:
            raise RecordError(f'{where}: field "role" is missing (format: {fmt})')
        if isinstance(role, str):
            role = field_map.get(role, role)
        if role not in CHAT_ROLES:
            raise RecordError(
                f"{where}.role {role!r} is not one of {', '.join(CHAT_ROLES)}"
                " (rename roles with the field map, e.g. gpt=assistant)"
            )
        content = message.get("content")
        calls_tools = role == "assistant" and message.get("tool_calls")
        if "content" not in message and not calls_tools:
            raise RecordError(f'{where}: field "content" is missing (format: {fmt})')
        if isinstance(content, list):
            content = _text_parts(content, f"{where}.content")
        if calls_tools and not content:
            content = ""  # an assistant turn that only calls tools
        elif not isinstance(content, str):
            raise RecordError(f"{where}.content must be a string, got {_type_name(content)}")
        elif not content.strip():
            raise RecordError(f"{where}.content is an empty string")
        converted = {k: message[k] for k in MESSAGE_KEYS[2:] if message.get(k) is not None}
        out.append({"role": role, "content": content, **converted})
        texts.append(content)
    return out, texts


def _text_parts(parts: list, where: str) -> str:
    """OpenAI's content-part array, text parts only, as the one string templates render."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = repr(kind) if kind is not None else _type_name(part)
            raise RecordError(f"{where}[{j}]: content part {shown} is not supported (text parts only)")
        if not isinstance(part.get("text"), str):
            raise RecordError(f'{where}[{j}]: field "text" must be a string, got {_type_name(part.get("text"))}')
        texts.append(part["text"])
    return "".join(texts)


def _chat(record: dict, field_map: dict[str, str]) -> tuple[dict, str]:
    if "messages" not in record:
        hint = ""
        if "conversations" in record:
            hint = " (ShareGPT data? map it: conversations=messages from=role value=content human=user gpt=assistant)"
        raise RecordError(f'field "messages" is missing (format: chat){hint}')
    out, texts = _messages(record["messages"], field_map, "messages", "chat")
    if out[-1]["role"] != "assistant":
        raise RecordError(
            f"the last message is from {out[-1]['role']!r}, not 'assistant': nothing to learn from"
        )
    converted_record: dict[str, Any] = {"messages": out}
    if isinstance(record.get("tools"), list):
        converted_record["tools"] = record["tools"]
    return converted_record, "\n".join(texts)


def _answer(value: Any, name: str, field_map: dict[str, str]) -> tuple[str | list[dict], str]:
    """A preference completion: a string, or a list of assistant messages."""
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f'field "{name}" is an empty string (format: preference)')
        return value, value
    if isinstance(value, list):
        messages, texts = _messages(value, field_map, name, "preference")
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                raise RecordError(f"{name}[{i}].role is {message['role']!r}: the answers of a "
                                  "preference pair are assistant messages")
        return messages, "\n".join(texts)
    if value is None:
        raise RecordError(f'field "{name}" is missing (format: preference)')
    raise RecordError(f'field "{name}" must be a string or a list of assistant messages, '
                      f"got {_type_name(value)}")


def _preference(record: dict, field_map: dict[str, str]) -> tuple[dict, str]:
    """{prompt, chosen, rejected}, or OpenAI's {input: {messages}, preferred_output,
    non_preferred_output}, as it comes."""
    openai = "input" in record or "preferred_output" in record or "non_preferred_output" in record
    if openai:
        names = ("input.messages", "preferred_output", "non_preferred_output")
        given = record.get("input")
        if not isinstance(given, dict):
            if "input" not in record:
                raise RecordError('field "input" is missing (format: preference, OpenAI\'s DPO shape)')
            raise RecordError(f'field "input" must be an object with "messages", got {_type_name(given)}')
        if "messages" not in given:
            raise RecordError('field "input.messages" is missing (format: preference)')
        prompt_value, chosen_value, rejected_value = (
            given["messages"], record.get("preferred_output"), record.get("non_preferred_output"))
        tools = given.get("tools")
    else:
        names = ("prompt", "chosen", "rejected")
        if "prompt" not in record:
            raise RecordError('field "prompt" is missing (format: preference)')
        prompt_value, chosen_value, rejected_value = (
            record["prompt"], record.get("chosen"), record.get("rejected"))
        tools = record.get("tools")
    if isinstance(prompt_value, str):
        if not prompt_value.strip():
            raise RecordError(f'field "{names[0]}" is an empty string (format: preference)')
        prompt: str | list[dict] = prompt_value
        prompt_text = prompt_value
    elif isinstance(prompt_value, list):
        prompt, texts = _messages(prompt_value, field_map, names[0], "preference")
        if prompt[-1]["role"] == "assistant":
            raise RecordError(f"{names[0]}: the last message is from 'assistant'; the prompt ends "
                              "where the chosen and rejected answers begin")
        prompt_text = "\n".join(texts)
    else:
        raise RecordError(f'field "{names[0]}" must be a string or a list of chat messages, '
                          f"got {_type_name(prompt_value)}")
    chosen, chosen_text = _answer(chosen_value, names[1], field_map)
    rejected, rejected_text = _answer(rejected_value, names[2], field_map)
    if " ".join(chosen_text.split()) == " ".join(rejected_text.split()):
        raise RecordError(f'"{names[1]}" and "{names[2]}" are the same answer: nothing to prefer')
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        converted: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        converted = conversational_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        if isinstance(tools, list):
            converted["tools"] = tools
    # The pair is the unit of duplicate removal: prompt and both answers.
    return converted, f"{prompt_text}\n{chosen_text}\n{rejected_text}"


def conversational_pair(record: dict) -> dict:
    """A preference record in TRL's conversational shape (strings become messages)."""
    prompt = record["prompt"]
    out = dict(record)
    out["prompt"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    for key in ("chosen", "rejected"):
        if isinstance(record[key], str):
            out[key] = [{"role": "assistant", "content": record[key]}]
    return out


def unify_preference_records(records: list[dict]) -> list[dict]:
    """TRL needs one shape per dataset: when any pair is conversational, all become so."""
    if any(isinstance(r.get("prompt"), list) for r in records):
        return [conversational_pair(r) for r in records]
    return records


def record_size(record: dict) -> int:
    """Rough size in bytes of the strings in a record (UTF-8 of ASCII-ish text)."""
    size = 0
    stack: list[Any] = []
    for value in record.values():
        if type(value) is str:
            size += len(value)
        else:
            stack.append(value)
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
            category_field: str | None = None, *, parse_json_strings: bool = False,
            render: Callable[[dict], int] | None = None) -> Example:
    """Validate `raw` against `fmt`; raise RecordError naming the problem.

    `render` (chat_templates.ChatRenderer.count) renders a chat record with the model's chat
    template and returns its length; what the template cannot render is a RecordError here,
    at validation, not an error inside the trainer. Given one, the model has a chat template:
    instruction and completion records become user/assistant conversations rendered with it
    (finetune_api.prompts), as served through /v1/chat/completions."""
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
        converted, dedup_text = _instruction(record, render is not None)
    elif fmt == "completion":
        converted, dedup_text = _completion(record, render is not None)
    elif fmt == "chat":
        converted, dedup_text = _chat(record, field_map)
    elif fmt == "text":
        converted, dedup_text = _text(record)
    elif fmt == "preference":
        converted, dedup_text = _preference(record, field_map)
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
    rendered = render(converted) if render is not None and "messages" in converted else None
    return Example(where, converted, dedup_text, category, near_text=_learned_text(converted),
                   rendered_tokens=rendered)


def _learned_text(converted: dict[str, Any]) -> str | None:
    """The texts of every non-system message of a chat record (or a preference prompt given as
    messages, with its answers); None when the record has no system message to leave out."""
    def contents(messages: Any) -> list[tuple[str, str]]:
        return [(m["role"], m["content"]) for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []

    turns = contents(converted.get("messages")) + contents(converted.get("prompt"))
    if not any(role == "system" for role, _ in turns):
        return None
    texts = [text for role, text in turns if role != "system"]
    for key in ("chosen", "rejected"):
        answer = converted.get(key)
        texts += [answer] if isinstance(answer, str) else [text for _, text in contents(answer)]
    return "\n".join(texts)


# Formats whose records convert one field at a time, without the field map's role renames.
_BULK_FORMATS = {"instruction": _instruction, "completion": _completion, "text": _text}


def _texts_ok(values: list, *, allow_empty: bool = False) -> bool:
    """Every value a str (not None, not missing), and not blank unless allowed."""
    if values and set(map(type, values)) != {str}:
        return False
    return allow_empty or (all(values) and not any(map(str.isspace, values)))


def _longest(*columns: list[str]) -> int:
    """A bound on the size of each record made of one string from each column."""
    return sum(max(map(len, column), default=0) for column in columns)


def _instruction_columns(records: list[dict]) -> tuple[list[dict], list[str], int] | None:
    """_instruction() for records whose fields are all well-formed, in bulk; None otherwise."""
    instructions = [r.get("instruction") for r in records]
    outputs = [r.get("output") for r in records]
    inputs = ["" if (x := r.get("input")) is None else x for r in records]
    if not (_texts_ok(instructions) and _texts_ok(outputs) and _texts_ok(inputs, allow_empty=True)):
        return None
    with_input = INSTRUCTION_WITH_INPUT_TEMPLATE.format
    # The template without input is text, the instruction, text: joined, not parsed each time.
    head, *tail = INSTRUCTION_TEMPLATE.format(instruction="\0").split("\0")
    if len(tail) == 1:
        prompts = [with_input(instruction=i, input=x) if x and not x.isspace() else head + i + tail[0]
                   for i, x in zip(instructions, inputs)]
    else:
        prompts = [with_input(instruction=i, input=x) if x and not x.isspace()
                   else INSTRUCTION_TEMPLATE.format(instruction=i) for i, x in zip(instructions, inputs)]
    converted = [{"prompt": p, "completion": o} for p, o in zip(prompts, outputs)]
    return (converted, [f"{i}\n{x}\n{o}" for i, x, o in zip(instructions, inputs, outputs)],
            _longest(prompts, outputs))


def _completion_columns(records: list[dict]) -> tuple[list[dict], list[str], int] | None:
    prompts = [r.get("prompt") for r in records]
    completions = [r.get("completion") for r in records]
    if not (_texts_ok(prompts, allow_empty=True) and _texts_ok(completions)):
        return None
    return ([{"prompt": p, "completion": c} for p, c in zip(prompts, completions)],
            [f"{p}\n{c}" for p, c in zip(prompts, completions)], _longest(prompts, completions))


def _text_columns(records: list[dict]) -> tuple[list[dict], list[str], int] | None:
    texts = [r.get("text") for r in records]
    if not _texts_ok(texts):
        return None
    return [{"text": t} for t in texts], texts, _longest(texts)


_COLUMNS = {"instruction": _instruction_columns, "completion": _completion_columns,
            "text": _text_columns}


def _same_as_one_by_one(records: list[dict], converted: list[dict], texts: list[str], one: Callable) -> bool:
    """The bulk conversion agrees with the format's own converter on a few records (the
    first, and the first with an input): it is only a faster way to the same records."""
    with_input = next((i for i, r in enumerate(records) if r.get("input")), 0)
    return all(one(records[i]) == (converted[i], texts[i]) for i in {0, with_input})


@dataclass(slots=True)
class ConvertedBlock:
    """What convert() makes of a block of records, as columns (see Example)."""

    records: list[dict[str, Any]]
    dedup_texts: list[str]
    near_texts: list[str | None] | None  # None: every one is None
    categories: list[str | None]
    rendered_tokens: list[int | None] | None  # None: every one is None


def convert_block(raws: list, fmt: str, field_map: dict[str, str],
                  category_field: str | None = None, *,
                  render: Callable[[dict], int] | None = None) -> ConvertedBlock | None:
    """convert() for a whole block of records of the instruction, completion or text format,
    with the per-record work of convert() done in bulk; None when any record needs convert()
    (a bad or oversized record, another format): the caller then converts the block one
    record at a time, so errors and their line numbers are exactly convert()'s."""
    one = _BULK_FORMATS.get(fmt)
    if one is None or not raws or set(map(type, raws)) != {dict}:
        return None
    records = [apply_field_map(raw, field_map) for raw in raws] if field_map else raws
    if render is not None and fmt in ("instruction", "completion"):
        # The model has a chat template: these records become conversations (convert()'s
        # `render is not None`), which the bulk columns (the Alpaca/raw prompt) are not.
        one, columns = functools.partial(one, chat=True), None
    else:
        columns = _COLUMNS[fmt](records)
    if columns is not None and not _same_as_one_by_one(records, *columns[:2], one):
        columns = None
    try:
        if columns is None:  # a bad record is among them, or the format changed
            pairs = list(map(one, records))
            columns = [pair[0] for pair in pairs], [pair[1] for pair in pairs], None
        converted, dedup_texts, longest = columns
        rendered = None
        if render is not None and any("messages" in c for c in converted):
            rendered = [render(c) if "messages" in c else None for c in converted]
    except RecordError:
        return None
    if (longest is None or longest > MAX_RECORD_BYTES) and \
            max(map(record_size, converted)) > MAX_RECORD_BYTES:
        return None
    near = None
    if longest is None and any("messages" in c or isinstance(c.get("prompt"), list)
                               for c in converted):
        near = list(map(_learned_text, converted))
    if category_field:
        categories = ["(missing)" if (value := record.get(category_field)) is None else str(value)
                      for record in records]
    else:
        categories = [None] * len(converted)
    return ConvertedBlock(converted, dedup_texts, near, categories, rendered)
