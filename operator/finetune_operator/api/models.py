"""Typed views of FineTuneJob and InferenceService, parsed once from the custom resource.

Field names are the spec's camelCase names in snake_case; defaults are the schema's defaults
(tests/test_api_schema.py fails when they disagree). Only the standard library is used.

    job = FineTuneJob.from_resource(body)
    job.spec.training.learning_rate   # 0.0002 when the user left it out
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from finetune_operator.api.schema import API_VERSION

FREE_FORM = dict[str, Any]


class InvalidResource(ValueError):
    """The object does not have the shape the schema promises (e.g. parsed without the API server)."""


def camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def snake(camel_name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel_name).lower()


# --- parsing ---------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_value(tp: Any, value: Any, path: str) -> Any:
    tp = _unwrap_optional(tp)
    if value is None or tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InvalidResource(f"{path}: expected an object, got {type(value).__name__}")
        return parse(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise InvalidResource(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_parse_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # an int-or-string quantity such as memory: 64
    if tp in (str, int, bool) and not isinstance(value, tp):
        raise InvalidResource(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def parse(cls: type, data: dict, path: str = "") -> Any:
    """Builds dataclass ``cls`` from a camelCase dict; absent fields take the dataclass default."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f.metadata.get("json", camel(f.name))
        where = f"{path}.{key}" if path else key
        if key in data and data[key] is not None:
            kwargs[f.name] = _parse_value(hints[f.name], data[key], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InvalidResource(f"{where} is required")
    return cls(**kwargs)


def to_dict(value: Any) -> Any:
    """The camelCase dict of a model (fields that are None are left out)."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is not None:
                out[f.metadata.get("json", camel(f.name))] = to_dict(item)
        return out
    if isinstance(value, list):
        return [to_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: to_dict(v) for k, v in value.items()}
    return value


model = dataclass(kw_only=True)


def _default(factory: Any) -> Any:
    return field(default_factory=factory)


# --- shared ----------------------------------------------------------------------------------


@model
class SecretKeyRef:
    name: str
    key: str = "token"


@model
class LocalRef:
    name: str


@model
class Model:
    source: str
    revision: Optional[str] = None
    token_secret_ref: Optional[SecretKeyRef] = None
    trust_remote_code: bool = False


@model
class Toleration:
    key: Optional[str] = None
    operator: Optional[str] = None
    value: Optional[str] = None
    effect: Optional[str] = None
    toleration_seconds: Optional[int] = None


@model
class VLLM:
    image: Optional[str] = None
    served_model_name: Optional[str] = None
    max_model_len: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_lora_rank: int = 16
    max_loras: int = 4
    dtype: str = "auto"
    extra_args: list[str] = _default(list)


@model
class Condition:
    type: str
    status: str
    reason: str
    message: str
    last_transition_time: str
    observed_generation: Optional[int] = None


@model
class Metadata:
    name: str
    namespace: Optional[str] = None
    uid: Optional[str] = None
    generation: Optional[int] = None
    resource_version: Optional[str] = None
    labels: dict[str, str] = _default(dict)
    annotations: dict[str, str] = _default(dict)


# --- FineTuneJob spec ------------------------------------------------------------------------


@model
class LoRA:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = _default(lambda: ["all-linear"])
    bias: str = "none"


@model
class Quantization:
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"


@model
class Method:
    type: str = "lora"
    lora: Optional[LoRA] = None
    quantization: Optional[Quantization] = None

    def __post_init__(self) -> None:
        # The schema cannot default a block that exists only for some methods; fill it here
        # with the same defaults (see docs/api.md, "Defaults of optional blocks").
        if self.type in ("lora", "qlora") and self.lora is None:
            self.lora = LoRA()
        if self.type == "qlora" and self.quantization is None:
            self.quantization = Quantization()

    @property
    def uses_adapter(self) -> bool:
        return self.type in ("lora", "qlora")


@model
class Dedup:
    exact: bool = True
    near_threshold: float = 0.9


@model
class DatasetMix:
    source: str
    ratio: float
    format: str = "instruction"


@model
class Dataset:
    source: str
    split: str = "train"
    format: str = "instruction"
    field_map: dict[str, str] = _default(dict)
    eval_fraction: float = 0.05
    eval_source: Optional[str] = None
    dedup: Dedup = _default(Dedup)
    min_examples: int = 10
    max_invalid_fraction: float = 0.1
    length_policy: str = "truncate"
    category_field: Optional[str] = None
    mix: Optional[DatasetMix] = None


@model
class EarlyStopping:
    patience: int
    threshold: float = 0.0


@model
class Training:
    epochs: float = 1.0
    max_steps: Optional[int] = None
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_seq_length: int = 1024
    packing: str = "auto"
    precision: str = "bf16"
    optimizer: str = "adamw_torch"
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    eval_steps: Optional[int] = None
    save_steps: int = 100
    save_total_limit: int = 3
    metric_for_best_model: str = "eval_loss"
    early_stopping: Optional[EarlyStopping] = None
    seed: int = 42
    loss_spike_factor: float = 0.0


@model
class EvalPrompt:
    prompt: str
    reference: Optional[str] = None


@model
class Evaluation:
    metrics: list[str] = _default(list)
    prompts: list[EvalPrompt] = _default(list)
    max_new_tokens: int = 128


@model
class TrainerResources:
    gpus_per_node: int = 1
    nodes: int = 1
    cpu: Optional[str] = None
    memory: Optional[str] = None
    node_selector: dict[str, str] = _default(dict)
    tolerations: list[Toleration] = _default(list)
    affinity: Optional[FREE_FORM] = None
    priority_class_name: Optional[str] = None
    queue_name: Optional[str] = None
    image: Optional[str] = None
    active_deadline_seconds: Optional[int] = None


@model
class Storage:
    existing_claim: Optional[str] = None
    size: str = "20Gi"
    storage_class_name: Optional[str] = None
    access_modes: Optional[list[str]] = None
    reclaim_policy: str = "Retain"


@model
class Push:
    uri: str
    token_secret_ref: Optional[SecretKeyRef] = None
    private: bool = True


@model
class Output:
    merge: bool = False
    push: Optional[Push] = None


@model
class MlflowTracking:
    tracking_uri: str
    experiment: Optional[str] = None
    secret_ref: Optional[LocalRef] = None


@model
class TensorboardTracking:
    enabled: bool = True


@model
class WandbTracking:
    project: str
    entity: Optional[str] = None
    mode: str = "auto"
    base_url: Optional[str] = None
    api_key_secret_ref: Optional[SecretKeyRef] = None


@model
class Tracking:
    mlflow: Optional[MlflowTracking] = None
    tensorboard: Optional[TensorboardTracking] = None
    wandb: Optional[WandbTracking] = None
    log_adapter: bool = False


@model
class Deploy:
    inference_service: Optional[str] = None
    replicas: int = 1
    gpus: int = 1
    node_selector: dict[str, str] = _default(dict)
    tolerations: list[Toleration] = _default(list)
    vllm: Optional[VLLM] = None


@model
class FineTuneJobSpec:
    model: Model
    method: Method = _default(lambda: Method(type="lora", lora=LoRA()))
    dataset: Dataset
    training: Training = _default(Training)
    evaluation: Evaluation = _default(Evaluation)
    resources: TrainerResources = _default(TrainerResources)
    storage: Storage = _default(Storage)
    output: Output = _default(Output)
    tracking: Optional[Tracking] = None
    deploy: Optional[Deploy] = None
    suspend: bool = False
    ttl_seconds_after_finished: Optional[int] = None


# --- FineTuneJob status ----------------------------------------------------------------------


@model
class Progress:
    step: Optional[int] = None
    total_steps: Optional[int] = None
    epoch: Optional[float] = None
    percent: Optional[int] = None
    eta_seconds: Optional[int] = None


@model
class TrainingMetrics:
    train_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    perplexity: Optional[float] = None
    learning_rate: Optional[float] = None
    tokens_per_second: Optional[float] = None


@model
class TokenLengthPercentiles:
    p50: Optional[int] = None
    p90: Optional[int] = None
    p99: Optional[int] = None
    max: Optional[int] = None


@model
class DatasetReport:
    examples_read: Optional[int] = None
    rejected: Optional[int] = None
    duplicates_removed: Optional[int] = None
    near_duplicates_removed: Optional[int] = None
    train_examples: Optional[int] = None
    eval_examples: Optional[int] = None
    content_hash: Optional[str] = None
    truncated: Optional[int] = None
    dropped_too_long: Optional[int] = None
    dropped_no_trainable_tokens: Optional[int] = None
    mix_examples: Optional[int] = None
    token_length_percentiles: Optional[TokenLengthPercentiles] = None
    token_lengths_approximate: Optional[bool] = None
    first_errors: list[str] = _default(list)
    warnings: list[str] = _default(list)
    problems: list[str] = _default(list)


@model
class Checkpoints:
    latest: Optional[str] = None
    best: Optional[str] = None
    count: Optional[int] = None


@model
class Artifacts:
    adapter: Optional[str] = None
    merged: Optional[str] = None
    volume: Optional[str] = None
    pushed: Optional[str] = None


@model
class Endpoint:
    name: Optional[str] = None
    url: Optional[str] = None


@model
class MlflowRunStatus:
    state: Optional[str] = None
    message: Optional[str] = None
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None
    run_id: Optional[str] = None
    run_url: Optional[str] = None
    adapter_artifact: Optional[str] = None


@model
class TensorboardStatus:
    state: Optional[str] = None
    message: Optional[str] = None
    log_dir: Optional[str] = None


@model
class WandbRunStatus:
    state: Optional[str] = None
    message: Optional[str] = None
    mode: Optional[str] = None
    project: Optional[str] = None
    run_dir: Optional[str] = None
    run_url: Optional[str] = None
    adapter_artifact: Optional[str] = None


@model
class TrackingStatus:
    mlflow: Optional[MlflowRunStatus] = None
    tensorboard: Optional[TensorboardStatus] = None
    wandb: Optional[WandbRunStatus] = None


@model
class FineTuneJobStatus:
    phase: Optional[str] = None
    conditions: list[Condition] = _default(list)
    observed_generation: Optional[int] = None
    start_time: Optional[str] = None
    completion_time: Optional[str] = None
    progress: Optional[Progress] = None
    metrics: Optional[TrainingMetrics] = None
    dataset: Optional[DatasetReport] = None
    checkpoints: Optional[Checkpoints] = None
    artifacts: Optional[Artifacts] = None
    attempts: Optional[int] = None
    restarts: Optional[int] = None
    gpu_hours: Optional[float] = None
    estimated_cost: Optional[str] = None
    trainer_job: Optional[str] = None
    tracking: Optional[TrackingStatus] = None
    inference_service: Optional[Endpoint] = None


@model
class FineTuneJob:
    KIND: typing.ClassVar[str] = "FineTuneJob"

    metadata: Metadata
    spec: FineTuneJobSpec
    status: FineTuneJobStatus = _default(FineTuneJobStatus)

    @classmethod
    def from_resource(cls, obj: dict) -> "FineTuneJob":
        return _from_resource(cls, obj)

    @property
    def started(self) -> bool:
        """Training started: the spec is frozen except suspend, deploy, ttlSecondsAfterFinished."""
        return self.status.start_time is not None


# --- InferenceService ------------------------------------------------------------------------


@model
class Adapter:
    name: str
    fine_tune_job_ref: Optional[LocalRef] = None
    path: Optional[str] = None


@model
class MergedModel:
    fine_tune_job_ref: Optional[LocalRef] = None
    path: Optional[str] = None


@model
class ServingResources:
    gpus: int = 1
    cpu: Optional[str] = None
    memory: Optional[str] = None
    node_selector: dict[str, str] = _default(dict)
    tolerations: list[Toleration] = _default(list)
    affinity: Optional[FREE_FORM] = None
    priority_class_name: Optional[str] = None


@model
class Autoscaling:
    min_replicas: int = 1
    max_replicas: int
    target_requests_waiting: int = 4


@model
class InferenceServiceSpec:
    model: Model
    adapters: list[Adapter] = _default(list)
    merged_model: Optional[MergedModel] = None
    replicas: int = 1
    resources: ServingResources = _default(ServingResources)
    vllm: Optional[VLLM] = None
    autoscaling: Optional[Autoscaling] = None


@model
class InferenceServiceStatus:
    phase: Optional[str] = None
    conditions: list[Condition] = _default(list)
    observed_generation: Optional[int] = None
    replicas: Optional[int] = None
    ready_replicas: Optional[int] = None
    url: Optional[str] = None
    served_models: list[str] = _default(list)
    revision: Optional[str] = None


@model
class InferenceService:
    KIND: typing.ClassVar[str] = "InferenceService"

    metadata: Metadata
    spec: InferenceServiceSpec
    status: InferenceServiceStatus = _default(InferenceServiceStatus)

    @classmethod
    def from_resource(cls, obj: dict) -> "InferenceService":
        return _from_resource(cls, obj)


def _from_resource(cls: type, obj: dict) -> Any:
    if obj.get("kind", cls.KIND) != cls.KIND:
        raise InvalidResource(f"kind: expected {cls.KIND}, got {obj.get('kind')!r}")
    if obj.get("apiVersion", API_VERSION) != API_VERSION:
        raise InvalidResource(f"apiVersion: expected {API_VERSION}, got {obj.get('apiVersion')!r}")
    return parse(cls, {key: obj.get(key) for key in ("metadata", "spec", "status")})
