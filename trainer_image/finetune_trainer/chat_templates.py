"""Chat templates: which one a job renders with (`dataset.chatTemplate`), and conversations
rendered into token ids with the assistant turns located (issue 16).

The loss mask is computed by rendering prefixes, for any template: the assistant turn i is
the text between the rendering of messages[:i] with the generation prompt and the rendering
of messages[:i+1], trailing whitespace left out (ChatML's newline after `<|im_end|>` is the
template's separator, not something the model writes). Each piece is tokenized on its own,
as vLLM tokenizes a rendered prompt and the model then generates the answer's tokens. So the
masks do not depend on `{% generation %}` tags, which TRL 1.16 only adds to the templates it
knows (Llama 3.0 among them, not 3.1/3.2: those trained on system and user turns, date header
included). A template that renders earlier turns differently once later ones follow (one that
drops past reasoning, say) gives no mask: the record is an error at validation, never
silently trained whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError
from .data.formats import RecordError

CHATML = (
    "{%- if tools %}{{- raise_exception('the chatml template renders no tools') }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.tool_calls is defined and message.tool_calls %}"
    "{{- raise_exception('the chatml template renders no tool calls') }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The Llama 3.1 / 3.2 format: a system block with the knowledge and date header, one header
# per turn, <|eot_id|> after each, tools in the system block, one JSON tool call per turn.
LLAMA_3_1 = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set turns = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{%- if tools %}"
    "{{- 'You have access to the following functions. To call one, answer with JSON: '"
    " + '{\"name\": function name, \"parameters\": {argument name: value}}.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson(indent=4) + '\\n\\n' }}{%- endfor %}"
    "{%- endif %}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'assistant' and message.tool_calls is defined and message.tool_calls %}"
    "{%- if message.tool_calls | length != 1 %}"
    "{{- raise_exception('llama-3.1 renders one tool call per assistant turn') }}{%- endif %}"
    "{%- set call = message.tool_calls[0]['function'] %}"
    "{%- set arguments = call['arguments'] if call['arguments'] is string else call['arguments'] | tojson %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + call['name']"
    " + '\", \"parameters\": ' + arguments + '}<|eot_id|>' }}"
    "{%- elif message['role'] in ['tool', 'ipython'] %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# name -> (template, the tokens it needs as single tokens of the vocabulary)
BUILTIN: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML, ("<|im_start|>", "<|im_end|>")),
    "llama-3.1": (LLAMA_3_1, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}
ARTIFACT = "chat_template.jinja"


class TemplateError(RecordError):
    """A conversation the chat template cannot render, or whose assistant turns it hides."""


def select(tokenizer, choice, resolve: Callable[[str], str] = lambda s: s) -> None:
    """Give `tokenizer` the template `dataset.chatTemplate` asks for (`choice`: its config;
    None keeps the model's own). Its special tokens must be single tokens of the vocabulary."""
    if not chosen(choice):
        return
    if choice.file:
        path = Path(resolve(choice.file))
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"dataset.chatTemplate.file {choice.file}: cannot read it ({exc})") from None
        return
    if choice.name not in BUILTIN:
        raise ConfigError(f"dataset.chatTemplate.name {choice.name!r} is not one of model, "
                          f"{', '.join(BUILTIN)}")
    template, markers = BUILTIN[choice.name]
    missing = [m for m in markers if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        raise ConfigError(f"dataset.chatTemplate.name {choice.name}: the model's tokenizer has no "
                          f"{', '.join(missing)} token, so the model could not learn where turns end; "
                          "use the model's own template or one built for its tokenizer")
    tokenizer.chat_template = template


def template_of(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named variants: the default one is the chat template
        template = template.get("default")
    return template or None


def missing_template_problem(tokenizer, formats: list[str]) -> str | None:
    """Why chat records cannot be rendered at all (a base model without a template). A bare
    `tokenizers.Tokenizer` (validate-data's counting) renders no templates: not asked."""
    if ("chat" in formats and hasattr(tokenizer, "apply_chat_template")
            and template_of(tokenizer) is None):
        return ("the model has no chat template, so chat records cannot be rendered: set "
                f"dataset.chatTemplate.name ({', '.join(BUILTIN)}) or dataset.chatTemplate.file")
    return None


def write_artifact(folder: Path, tokenizer) -> Path | None:
    """artifacts/chat_template.jinja: the template training rendered with, for serving."""
    template = template_of(tokenizer)
    if template is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ARTIFACT
    path.write_text(template, encoding="utf-8")
    return path


def chosen(choice) -> bool:
    """Whether dataset.chatTemplate replaces the model's own template (name or file)."""
    return choice is not None and bool(choice.file or choice.name not in (None, "model"))


def served_template(cfg) -> Path | None:
    """The template vLLM must be given (--chat-template) to render as training did: the
    artifact, when the job chose another template than the model's own."""
    path = cfg.paths.artifacts / ARTIFACT
    return path if chosen(cfg.dataset.chat_template) and path.is_file() else None


@dataclass
class Rendered:
    input_ids: list[int]
    assistant_masks: list[int]  # 1 where the token is part of an assistant turn

    @property
    def trainable(self) -> int:
        return sum(self.assistant_masks)


class ChatRenderer:
    """Renders chat records (`{"messages", "tools"?}`) with the tokenizer's template."""

    def __init__(self, tokenizer, loss_on: str = "assistant") -> None:
        self.tokenizer = tokenizer
        self.loss_on = loss_on

    def _text(self, messages: list[dict], tools: Any, generation: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=generation)
        except Exception as exc:  # noqa: BLE001 - a template raises what it likes (raise_exception, TypeError)
            message = str(exc).strip() or type(exc).__name__
            raise TemplateError(f"the chat template cannot render this conversation: {message}") from None

    def pieces(self, record: dict) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_assistant_turn) pieces, in order."""
        messages, tools = record["messages"], record.get("tools")
        full = self._text(messages, tools, False)
        if self.loss_on == "all":
            return [(full, True)]
        pieces: list[tuple[str, bool]] = []
        at = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._text(messages[:i], tools, True)
            through = self._text(messages[:i + 1], tools, False)
            if not (through.startswith(before) and full.startswith(through) and len(before) >= at):
                raise TemplateError(
                    f"messages[{i}]: the chat template renders the conversation before this "
                    "assistant turn differently once the turn follows, so the turn cannot be "
                    "located for the loss mask (set dataset.chatTemplate.lossOn all to train on "
                    "whole conversations, or use another template)")
            end = len(through.rstrip())
            if end <= len(before):
                raise TemplateError(f"messages[{i}]: the chat template renders this assistant "
                                    "turn as nothing")
            pieces += [(full[at:len(before)], False), (full[len(before):end], True)]
            at = end
        pieces.append((full[at:], False))
        if not any(trainable for _, trainable in pieces):
            raise TemplateError("the conversation has no assistant turn to learn from")
        return [(text, trainable) for text, trainable in pieces if text]

    def render(self, record: dict) -> Rendered:
        pieces = self.pieces(record)
        ids = self.tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
        input_ids: list[int] = []
        masks: list[int] = []
        for (_, trainable), piece_ids in zip(pieces, ids):
            input_ids += piece_ids
            masks += [int(trainable)] * len(piece_ids)
        return Rendered(input_ids, masks)

    def count(self, record: dict) -> int:
        """The record's length in tokens as trained (headers, BOS/EOS, tools included)."""
        return len(self.render(record).input_ids)


def dataset_renderer(tokenizer, chat_template=None) -> ChatRenderer | None:
    """The renderer for a dataset's chat records; None without a tokenizer or a template."""
    if not hasattr(tokenizer, "apply_chat_template") or template_of(tokenizer) is None:
        return None
    return ChatRenderer(tokenizer, getattr(chat_template, "loss_on", None) or "assistant")


def tokenized_records(renderer: ChatRenderer, records: list[dict]) -> list[dict]:
    """TRL-ready rows: input_ids, and assistant_masks unless the loss is on everything."""
    rows = []
    for record in records:
        rendered = renderer.render(record)
        row: dict[str, Any] = {"input_ids": rendered.input_ids}
        if renderer.loss_on != "all":
            row["assistant_masks"] = rendered.assistant_masks
        rows.append(row)
    return rows
