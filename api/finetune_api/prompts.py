"""How the trainer presents an instruction record's prompt (standard library only): the
trainer formats its data with these, and the operator renders held-out prompts the same way
when it scores adapter versions through vLLM."""

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
