"""How a job presents a prompt to the model (standard library only), shared by the trainer
(its data, its evaluation, the comparison) and the operator (promotion scoring, the demo).

The prompt format (`status.dataset.promptFormat`, `reports/dataset.json`):

- `chat-template`: the model's chat template (or the one `dataset.chatTemplate` chose). Chat
  records, and instruction and completion records when the model has a template: an
  instruction record is the conversation user = the instruction (and its input, after a
  blank line), assistant = the output; a completion record user = the prompt, assistant =
  the completion (an empty prompt: an empty user turn). Such a model is asked through
  `/v1/chat/completions` (the template renders the question).
- `alpaca`: instruction records for a base model without any chat template: the Alpaca
  prompt below, completion = the output. Asked through `/v1/completions` with that prompt.
- `raw`: completion records without a template (prompt + completion as they are), text
  records, and preference pairs without a template. Asked with the prompt as it is.
"""

from __future__ import annotations

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

CHAT_TEMPLATE = "chat-template"
ALPACA = "alpaca"
RAW = "raw"
PROMPT_FORMATS = (CHAT_TEMPLATE, ALPACA, RAW)
# How a model trained in each format is asked (the model card says it).
ASKED_THROUGH = {
    CHAT_TEMPLATE: "/v1/chat/completions with messages (the server renders the chat template)",
    ALPACA: "/v1/completions with the Alpaca prompt (\"### Instruction:\\n...\\n\\n### Response:\\n\")",
    RAW: "/v1/completions with the prompt as it is",
}


def prompt_format(dataset_format: str, has_template: bool) -> str:
    """The prompt format a dataset of `dataset_format` is trained with, given whether the
    model (or dataset.chatTemplate) has a chat template."""
    if dataset_format == "chat" or (has_template and dataset_format in ("instruction", "completion",
                                                                         "preference")):
        return CHAT_TEMPLATE
    return ALPACA if dataset_format == "instruction" else RAW


def unrecorded_prompt_format(dataset_format: str) -> str:
    """The prompt format of a run that recorded none (trained before instruction and completion
    records went through the chat template): chat and preference data through the template,
    instruction records with the Alpaca prompt, the rest raw."""
    return prompt_format(dataset_format, dataset_format in ("chat", "preference"))


def instruction_user_turn(instruction: str, input_: str = "") -> str:
    """The user turn of an instruction record: the instruction, and its input (when it has
    one) after a blank line."""
    return f"{instruction}\n\n{input_}" if input_.strip() else instruction


def instruction_conversation(instruction: str, input_: str, output: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": instruction_user_turn(instruction, input_)},
            {"role": "assistant", "content": output}]


def completion_conversation(prompt: str, completion: str) -> list[dict[str, str]]:
    """An empty prompt stays an empty user turn: a conversation needs one before the answer
    (transformers renders no empty conversation, so an answer alone has no prefix to mask)."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def alpaca_prompt(instruction: str, input_: str = "") -> str:
    if input_.strip():
        return INSTRUCTION_WITH_INPUT_TEMPLATE.format(instruction=instruction, input=input_)
    return INSTRUCTION_TEMPLATE.format(instruction=instruction)


def text_prompt(fmt: str, prompt: str) -> str:
    """An evaluation prompt (a question) as a completion request's text, in format `fmt`
    (`alpaca` or `raw`; `chat-template` prompts are asked as messages instead)."""
    return alpaca_prompt(prompt) if fmt == ALPACA else prompt
