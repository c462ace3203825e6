"""Exit codes: defined in the API package (`finetune_api.exitcodes`), which the operator reads."""

from finetune_api.exitcodes import PERMANENT, RETRYABLE, SUCCESS, TERMINATION_LOG

__all__ = ["PERMANENT", "RETRYABLE", "SUCCESS", "TERMINATION_LOG"]
