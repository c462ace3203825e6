"""The trainer's one input: a config file rendered by the operator from a FineTuneJob.

The file is JSON (or YAML) whose sections carry the same camelCase field names as the
FineTuneJob spec (`model`, `method`, `dataset`, `training`, `evaluation`, `output`), plus
`job` (who we report to) and `paths` (where the job volume is mounted). Parsing happens
once, here, into typed dataclasses; the rest of the trainer works with those.

This module must stay free of heavy imports: the operator imports it to render configs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINER_CONFIG_KIND = "TrainerConfig"
TRAINER_CONFIG_API_VERSION = "finetune.dev/v1alpha1"

METHODS = ("full", "lora", "qlora")
DATASET_FORMATS = ("instruction", "completion", "chat", "text")
PRECISIONS = ("bf16", "fp16", "fp32")
PACKING_MODES = ("auto", "on", "off")
LENGTH_POLICIES = ("truncate", "drop")


class ConfigError(ValueError):
    """The config cannot be used; retrying will not help (a permanent error)."""


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a camelCase mapping, naming the path of any bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = _snake(key)
        if name not in fields:
            raise ConfigError(f"{where}.{key}: unknown field")
        nested = _NESTED.get((cls.__name__, name))
        if nested is not None and value is not None:
            value = _build(nested, value, f"{where}.{key}")
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where}: {exc}") from exc
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def _to_camel_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {
            _camel(f.name): _to_camel_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None
        }
    if isinstance(obj, list):
        return [_to_camel_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_camel_dict(v) for k, v in obj.items()}
    return obj


def _one_of(value: Any, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


@dataclass
class JobRef:
    name: str = "local"
    namespace: str = "default"
    uid: str | None = None


@dataclass
class ModelConfig:
    """`source` is a Hugging Face id (`org/name` or `hf://org/name`), a local path or
    `pvc://claim/path` (resolved by the operator to a path under the job volume)."""

    source: str
    revision: str | None = None
    trust_remote_code: bool = False
    # Name of the environment variable holding the hub token (never the token itself).
    token_env: str | None = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"


@dataclass
class QuantizationConfig:
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"


@dataclass
class MethodConfig:
    type: str = "lora"
    lora: LoraConfig | None = None
    quantization: QuantizationConfig | None = None

    def validate(self, where: str) -> None:
        _one_of(self.type, METHODS, f"{where}.type")
        if self.type == "full" and (self.lora or self.quantization):
            raise ConfigError(f"{where}: lora/quantization are not allowed with type full")
        if self.type == "lora" and self.quantization:
            raise ConfigError(f"{where}.quantization: only allowed with type qlora")
        if self.type in ("lora", "qlora") and self.lora is None:
            self.lora = LoraConfig()
        if self.type == "qlora" and self.quantization is None:
            self.quantization = QuantizationConfig()


@dataclass
class DedupConfig:
    exact: bool = True
    # Jaccard similarity above which two records count as near-duplicates; 0 disables.
    near_threshold: float = 0.9


@dataclass
class MixConfig:
    """General-domain data mixed in against catastrophic forgetting."""

    source: str
    ratio: float = 0.1
    format: str | None = None


@dataclass
class DatasetConfig:
    source: str
    format: str = "instruction"
    split: str | None = None  # for hub datasets
    field_map: dict[str, str] = field(default_factory=dict)
    eval_fraction: float = 0.05
    eval_source: str | None = None
    dedup: DedupConfig = field(default_factory=DedupConfig)
    min_examples: int = 10
    # Share of records that may be invalid and dropped before the job fails.
    max_invalid_fraction: float = 0.0
    length_policy: str = "truncate"
    category_field: str | None = None
    mix: MixConfig | None = None

    def validate(self, where: str) -> None:
        _one_of(self.format, DATASET_FORMATS, f"{where}.format")
        _one_of(self.length_policy, LENGTH_POLICIES, f"{where}.lengthPolicy")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"{where}.evalFraction: must be in [0, 1)")


@dataclass
class EarlyStoppingConfig:
    patience: int = 3
    threshold: float = 0.0


@dataclass
class TrainingConfig:
    epochs: float = 1.0
    max_steps: int | None = None
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2.0e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_seq_length: int = 1024
    packing: str = "auto"
    precision: str = "bf16"
    optimizer: str = "adamw_torch"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 100
    save_total_limit: int = 3
    metric_for_best_model: str = "eval_loss"
    early_stopping: EarlyStoppingConfig | None = None
    seed: int = 42
    # Stop when a logged loss exceeds this multiple of the running minimum.
    loss_spike_factor: float = 10.0

    def validate(self, where: str) -> None:
        _one_of(self.precision, PRECISIONS, f"{where}.precision")
        if isinstance(self.packing, bool):
            self.packing = "on" if self.packing else "off"
        _one_of(self.packing, PACKING_MODES, f"{where}.packing")


@dataclass
class EvaluationConfig:
    metrics: list[str] = field(default_factory=list)  # bleu, rouge, exactMatch
    prompts: list[dict[str, str]] = field(default_factory=list)  # [{prompt, reference}]
    prompts_source: str | None = None
    max_new_tokens: int = 32


@dataclass
class OutputConfig:
    merge: bool = False
    push_uri: str | None = None  # hf://org/repo or s3://bucket/prefix
    push_token_env: str | None = None


@dataclass
class PathsConfig:
    """Where things live on the job volume."""

    root: str = "/workspace"

    @property
    def checkpoints(self) -> Path:
        return Path(self.root) / "checkpoints"

    @property
    def artifacts(self) -> Path:
        return Path(self.root) / "artifacts"

    @property
    def reports(self) -> Path:
        return Path(self.root) / "reports"

    @property
    def tracking(self) -> Path:
        """TensorBoard event files, the W&B run folder, the MLflow run id (to resume it)."""
        return Path(self.root) / "tracking"

    @property
    def data_cache(self) -> Path:
        return Path(self.root) / "data-cache"

    def resolve(self, source: str) -> str:
        """`pvc://<claim>/<path>` and `volume://<path>` name files on the job volume."""
        for prefix in ("volume://",):
            if source.startswith(prefix):
                return str(Path(self.root) / source[len(prefix):])
        if source.startswith("pvc://"):
            _, _, rest = source[len("pvc://"):].partition("/")
            return str(Path(self.root) / rest)
        return source


@dataclass
class ReportingConfig:
    # Patch the FineTuneJob's status with progress (needs in-cluster credentials).
    status_patch: bool = False
    metrics_port: int | None = 9400
    # Seconds between two status patches.
    status_interval: float = 5.0


WANDB_MODES = ("auto", "online", "offline")


@dataclass
class MlflowTrackingConfig:
    """An MLflow tracking server. Credentials come from the environment the operator fills
    from `spec.tracking.mlflow.secretRef` (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME
    and MLFLOW_TRACKING_PASSWORD), never from this file."""

    tracking_uri: str
    experiment: str | None = None  # default: "<namespace>/<job name>"

    def validate(self, where: str) -> None:
        if not isinstance(self.tracking_uri, str) or not self.tracking_uri.strip():
            raise ConfigError(f"{where}.trackingUri: must be a non-empty URI")


@dataclass
class TensorboardTrackingConfig:
    """TensorBoard event files under `<root>/tensorboard/` on the job volume."""

    enabled: bool = True


@dataclass
class WandbTrackingConfig:
    """Weights & Biases; the key comes from WANDB_API_KEY (filled from a Secret)."""

    project: str
    entity: str | None = None
    # auto: online when a key is set and the server answers, else offline (a run folder on
    # the job volume that `wandb sync` uploads later).
    mode: str = "auto"
    base_url: str | None = None

    def validate(self, where: str) -> None:
        _one_of(self.mode, WANDB_MODES, f"{where}.mode")


@dataclass
class TrackingConfig:
    mlflow: MlflowTrackingConfig | None = None
    tensorboard: TensorboardTrackingConfig | None = None
    wandb: WandbTrackingConfig | None = None
    # Upload the adapter (or the merged model's folder) as an artifact of the run.
    log_adapter: bool = False

    @property
    def any(self) -> bool:
        return bool(self.mlflow or (self.tensorboard and self.tensorboard.enabled) or self.wandb)


@dataclass
class TrainerConfig:
    model: ModelConfig
    dataset: DatasetConfig
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    job: JobRef = field(default_factory=JobRef)
    reporting: ReportingConfig = field(default_factory=ReportingConfig)
    tracking: TrackingConfig | None = None  # spec.tracking; absent: no tracker

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainerConfig":
        data = dict(data)
        data.pop("apiVersion", None)
        kind = data.pop("kind", TRAINER_CONFIG_KIND)
        if kind != TRAINER_CONFIG_KIND:
            raise ConfigError(f"kind: expected {TRAINER_CONFIG_KIND}, got {kind!r}")
        return _build(cls, data, "config")

    @classmethod
    def load(cls, path: str | Path) -> "TrainerConfig":
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            import yaml  # YAML for hand-written configs on a laptop

            data = yaml.safe_load(text)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = {"apiVersion": TRAINER_CONFIG_API_VERSION, "kind": TRAINER_CONFIG_KIND}
        out.update(_to_camel_dict(self))
        return out


_NESTED: dict[tuple[str, str], type] = {
    ("TrainerConfig", "model"): ModelConfig,
    ("TrainerConfig", "dataset"): DatasetConfig,
    ("TrainerConfig", "method"): MethodConfig,
    ("TrainerConfig", "training"): TrainingConfig,
    ("TrainerConfig", "evaluation"): EvaluationConfig,
    ("TrainerConfig", "output"): OutputConfig,
    ("TrainerConfig", "paths"): PathsConfig,
    ("TrainerConfig", "job"): JobRef,
    ("TrainerConfig", "reporting"): ReportingConfig,
    ("TrainerConfig", "tracking"): TrackingConfig,
    ("TrackingConfig", "mlflow"): MlflowTrackingConfig,
    ("TrackingConfig", "tensorboard"): TensorboardTrackingConfig,
    ("TrackingConfig", "wandb"): WandbTrackingConfig,
    ("MethodConfig", "lora"): LoraConfig,
    ("MethodConfig", "quantization"): QuantizationConfig,
    ("DatasetConfig", "dedup"): DedupConfig,
    ("DatasetConfig", "mix"): MixConfig,
    ("TrainingConfig", "early_stopping"): EarlyStoppingConfig,
}
