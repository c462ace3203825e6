"""The trainer's data pipeline: load, validate, clean, split and mix, before any GPU time.

`prepare_dataset(cfg, seed=..., max_seq_length=...)` returns train/eval records ready for
TRL's SFTTrainer and a DatasetReport; `validate_cli(argv)` is `finetune-trainer validate-data`.
"""

from .command import validate_cli
from .formats import INSTRUCTION_TEMPLATE, INSTRUCTION_WITH_INPUT_TEMPLATE, MAX_RECORD_BYTES
from .length import APPROX_TOKENS_PER_WORD, CHAT_MESSAGE_OVERHEAD
from .prepare import PreparedDataset, inspect_dataset, prepare_dataset
from .report import DatasetReport, DataValidationError, render_table, write_report

__all__ = [
    "APPROX_TOKENS_PER_WORD",
    "CHAT_MESSAGE_OVERHEAD",
    "DataValidationError",
    "DatasetReport",
    "INSTRUCTION_TEMPLATE",
    "INSTRUCTION_WITH_INPUT_TEMPLATE",
    "MAX_RECORD_BYTES",
    "PreparedDataset",
    "inspect_dataset",
    "prepare_dataset",
    "render_table",
    "validate_cli",
    "write_report",
]
