"""The trainer's one input, `TrainerConfig`: defined in the API package
(`finetune_api.trainer_config`, generated from `finetune_api/schema.py`) so that the operator
renders and the trainer reads the same sections. The names below are the trainer's own
spellings of the shared classes.
"""

from finetune_api.models import (
    LoRA as LoraConfig,
    DatasetMix as MixConfig,
    Dataset as DatasetConfig,
    Dedup as DedupConfig,
    EarlyStopping as EarlyStoppingConfig,
    Method as MethodConfig,
    Quantization as QuantizationConfig,
    Training as TrainingConfig,
)
from finetune_api.schema import (
    DATASET_FORMATS,
    LENGTH_POLICIES,
    METHODS,
    PACKING_MODES,
    PRECISIONS,
    TRAINER_CONFIG_KIND,
)
from finetune_api.trainer_config import (
    ConfigError,
    EvaluationConfig,
    JobRef,
    ModelConfig,
    OutputConfig,
    PathsConfig,
    ReportingConfig,
    TrainerConfig,
)

__all__ = [
    "DATASET_FORMATS", "LENGTH_POLICIES", "METHODS", "PACKING_MODES", "PRECISIONS",
    "TRAINER_CONFIG_KIND", "ConfigError", "DatasetConfig", "DedupConfig", "EarlyStoppingConfig",
    "EvaluationConfig", "JobRef", "LoraConfig", "MethodConfig", "MixConfig", "ModelConfig",
    "OutputConfig", "PathsConfig", "QuantizationConfig", "ReportingConfig", "TrainerConfig",
    "TrainingConfig",
]
