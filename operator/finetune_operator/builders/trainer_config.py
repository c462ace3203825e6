"""The trainer's one input: a TrainerConfig rendered from the FineTuneJob spec into an
annotation of the trainer pod template (`finetune.dev/trainer-config`), which a downward API
volume turns into the file /etc/finetune/config.json.

The config travels inside the Job, not in a ConfigMap of its own: the pods run exactly the
config their Job was created with (nothing edits it under a running job, as an edit of a
ConfigMap would reach the mounted file), and a job costs one object and one request fewer
(#14). A pod's annotations hold at most 256 KiB in all: a config larger than 192 KiB (long
evaluation prompts) goes into a ConfigMap `<job>-trainer-config` as before, and one larger
than a ConfigMap can hold is refused at admission (`config_too_large`).

Sections carry the spec's own field names. Secrets never enter the config: it names the
environment variables (`HF_TOKEN`, `PUSH_TOKEN`) the trainer Job fills from Secrets.
`pvc://<claim>/<path>` sources become paths: under /workspace for the job's own claim,
under /mnt/claims/<claim> (mounted read-only) for any other claim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from finetune_api.layout import OTHER_CLAIMS_DIR, RESULTS_DIR, WORKSPACE, job_folder
from finetune_api.models import FineTuneJob, to_dict
from finetune_api.schema import API_VERSION, TRAINER_CONFIG_KIND, MethodType
from finetune_api.sources import PVC, parse_source
from finetune_api.trainer_config import TrainerConfig

from finetune_operator import names
from finetune_operator.builders import object_meta
from finetune_operator.builders.storage import claim_name

CONFIG_DIR = "/etc/finetune"
CONFIG_KEY = "config.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
CONFIG_ANNOTATION = "finetune.dev/trainer-config"
# The API server limits a pod's annotations to 256 KiB in all (keys and values); the rest is
# room for the template's other annotations and for those of Kueue and other controllers.
MAX_ANNOTATION_BYTES = 192 * 1024
# A ConfigMap's data holds at most 1 MiB (less the key and the object's own fields).
MAX_CONFIG_MAP_BYTES = 1000 * 1024
MODEL_TOKEN_ENV = "HF_TOKEN"
PUSH_TOKEN_ENV = "PUSH_TOKEN"
# spec.tracking: the trackers' own variable names (their client libraries read them).
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
WANDB_KEY_ENV = "WANDB_API_KEY"
# spec.objectStorage: the AWS SDKs' standard variables (the trainer's S3 client reads them).
OBJECT_STORAGE_REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OBJECT_STORAGE_KEYS = OBJECT_STORAGE_REQUIRED_KEYS + ("AWS_SESSION_TOKEN", "AWS_REGION",
                                                      "AWS_ENDPOINT_URL")
TRAINER_METRICS_PORT = 9400
STATUS_INTERVAL_SECONDS = 5.0
COMPONENT = "trainer"


@dataclass(frozen=True)
class ClaimMount:
    claim: str
    path: str


def other_claims(job: FineTuneJob) -> list[ClaimMount]:
    """Claims other than the job volume that pvc:// sources name (mounted read-only)."""
    own = claim_name(job)
    seen: dict[str, ClaimMount] = {}
    for location in _sources(job):
        source = parse_source(location)
        if source.scheme == PVC:
            claim = source.authority
            if claim != own and claim not in seen:
                seen[claim] = ClaimMount(claim, f"{OTHER_CLAIMS_DIR}/{claim}")
    return list(seen.values())


def results_mount(job: FineTuneJob) -> ClaimMount | None:
    """spec.output.resultsFile's folder on another claim than the job's: the only place of
    that claim the trainer may write (mounted with that folder as its subPath)."""
    location = job.spec.output.results_file
    if not location:
        return None
    source = parse_source(location)
    if source.scheme != "pvc" or source.authority == claim_name(job):
        return None
    return ClaimMount(source.authority, source.path.rsplit("/", 1)[0])


def resolve_results_file(job: FineTuneJob) -> str | None:
    location = job.spec.output.results_file
    if not location:
        return None
    source = parse_source(location)
    if source.scheme == "s3":
        return location  # the trainer uploads it (spec.objectStorage's credentials)
    if source.authority == claim_name(job):
        return f"{WORKSPACE}/{source.path}"
    return f"{RESULTS_DIR}/{source.path.rsplit('/', 1)[1]}"


def _sources(job: FineTuneJob) -> list[str]:
    d = job.spec.dataset
    return [s for s in (job.spec.model.source, d.source, d.eval_source,
                        d.mix.source if d.mix else None, d.chat_template.file) if s]


def resolve_source(job: FineTuneJob, location: str | None) -> str | None:
    source = parse_source(location) if location is not None else None
    if source is None or source.scheme != PVC:
        return location
    claim, rest = source.authority, source.path
    root = WORKSPACE if claim == claim_name(job) else f"{OTHER_CLAIMS_DIR}/{claim}"
    return f"{root}/{rest}".rstrip("/") if rest else root


def build_trainer_config(job: FineTuneJob) -> dict:
    """The TrainerConfig as a dict, validated by the trainer's own parser."""
    spec = job.spec
    model: dict = {"source": resolve_source(job, spec.model.source),
                   "trustRemoteCode": spec.model.trust_remote_code}
    if spec.model.revision:
        model["revision"] = spec.model.revision
    if spec.model.token_secret_ref:
        model["tokenEnv"] = MODEL_TOKEN_ENV

    method: dict = {"type": spec.method.type}
    if spec.method.uses_adapter and spec.method.lora:
        method["lora"] = to_dict(spec.method.lora)
    if spec.method.type == MethodType.QLORA and spec.method.quantization:
        q = spec.method.quantization
        # `bits` is always 4 for QLoRA; the trainer's config has no field for it.
        method["quantization"] = {"quantType": q.quant_type, "doubleQuant": q.double_quant,
                                  "computeDtype": q.compute_dtype}
    if spec.method.objective != "sft":  # sft is the trainer's default: configs stay as they were
        method["objective"] = spec.method.objective
        if spec.method.dpo is not None:
            method["dpo"] = to_dict(spec.method.dpo)

    dataset = to_dict(spec.dataset)
    dataset["source"] = resolve_source(job, spec.dataset.source)
    if spec.dataset.eval_source:
        dataset["evalSource"] = resolve_source(job, spec.dataset.eval_source)
    if spec.dataset.mix:
        dataset["mix"]["source"] = resolve_source(job, spec.dataset.mix.source)
    if spec.dataset.chat_template.file:
        dataset["chatTemplate"]["file"] = resolve_source(job, spec.dataset.chat_template.file)

    output: dict = {"merge": spec.output.merge}
    if spec.output.push:
        output["pushUri"] = spec.output.push.uri
        if spec.output.push.uri.startswith("hf://"):
            output["pushPrivate"] = spec.output.push.private
        if spec.output.push.token_secret_ref:
            output["pushTokenEnv"] = PUSH_TOKEN_ENV
    if spec.output.results_file:
        output["resultsFile"] = resolve_results_file(job)

    config = {
        "apiVersion": API_VERSION,
        "kind": TRAINER_CONFIG_KIND,
        "job": {"name": job.metadata.name, "namespace": job.metadata.namespace,
                "uid": job.metadata.uid},
        "model": model,
        "method": method,
        "dataset": dataset,
        "training": to_dict(spec.training),
        "evaluation": to_dict(spec.evaluation),
        "output": output,
        "paths": {"root": WORKSPACE,
                  "jobFolder": job_folder(job.metadata.name, shared_claim=bool(spec.storage.existing_claim))},
        "reporting": {"statusPatch": True, "metricsPort": TRAINER_METRICS_PORT,
                      "statusInterval": STATUS_INTERVAL_SECONDS,
                      "reviewConfigMap": names.review_config_map(job.metadata.name)},
    }
    tracking = build_tracking_config(job)
    if tracking:
        config["tracking"] = tracking
    TrainerConfig.from_dict(config)  # raises ConfigError naming the field the trainer rejects
    return config


def build_tracking_config(job: FineTuneJob) -> dict | None:
    """spec.tracking for the trainer, without its Secret references (the credentials reach the
    trainer as environment variables, see trainer_job._env)."""
    t = job.spec.tracking
    if t is None or not (t.mlflow or t.tensorboard or t.wandb):
        return None
    out: dict = {"logAdapter": t.log_adapter}
    if t.mlflow:
        out["mlflow"] = {"trackingUri": t.mlflow.tracking_uri}
        if t.mlflow.experiment:
            out["mlflow"]["experiment"] = t.mlflow.experiment
    if t.tensorboard:
        out["tensorboard"] = {"enabled": t.tensorboard.enabled}
    if t.wandb:
        out["wandb"] = {k: v for k, v in to_dict(t.wandb).items() if k != "apiKeySecretRef"}
    return out


def render_config(job: FineTuneJob) -> str:
    """config.json as the trainer reads it."""
    return json.dumps(build_trainer_config(job), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def in_annotation(text: str) -> bool:
    """Whether a rendered config travels in the pod template (else in a ConfigMap)."""
    return len(text.encode()) <= MAX_ANNOTATION_BYTES


def pod_config(job: FineTuneJob) -> tuple[dict, dict]:
    """The pod template's annotations for the config, and the volume (`config`, mounted at
    CONFIG_DIR) that makes it the file /etc/finetune/config.json: a downward API volume
    reading the annotation, or (a config too large for it) the job's ConfigMap."""
    text = render_config(job)
    if in_annotation(text):
        return ({CONFIG_ANNOTATION: text},
                {"name": "config", "downwardAPI": {"items": [{
                    "path": CONFIG_KEY,
                    "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"}}]}})
    return {}, {"name": "config", "configMap": {"name": names.trainer_config_map(job.metadata.name)}}


def build_config_map(job: FineTuneJob) -> dict | None:
    """The ConfigMap of a config too large for the pod template; None for every other job."""
    text = render_config(job)
    if in_annotation(text):
        return None
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": object_meta(job, names.trainer_config_map(job.metadata.name), COMPONENT),
            "data": {CONFIG_KEY: text}}


def config_too_large(job: FineTuneJob) -> str | None:
    """Why the job's config fits in no ConfigMap, or None when it fits."""
    size = len(render_config(job).encode())
    if size <= MAX_CONFIG_MAP_BYTES:
        return None
    spec = job.spec
    sections = {f"spec.{k}": len(json.dumps(to_dict(v), ensure_ascii=False).encode())
                for k, v in (("dataset", spec.dataset), ("evaluation", spec.evaluation),
                             ("training", spec.training), ("method", spec.method),
                             ("model", spec.model), ("tracking", spec.tracking)) if v is not None}
    largest = max(sections, key=sections.get)
    return (f"the trainer config rendered from the spec is {size // 1024} KiB, more than the "
            f"{MAX_CONFIG_MAP_BYTES // 1024} KiB a ConfigMap can hold; the largest part is {largest} "
            f"({sections[largest] // 1024} KiB). Move long texts into files on the job's claim "
            "(dataset.chatTemplate.file, a pvc:// dataset) and create the job again")
