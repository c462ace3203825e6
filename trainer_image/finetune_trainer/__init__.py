"""The trainer that runs inside a FineTuneJob's pods (`python -m finetune_trainer`)."""

__version__ = "0.1.0"
