"""OpenAI's fine-tuning objects <-> FineTuneJobs. Pure functions over dicts.

A job id (`ftjob-<24 hex>`) is the FineTuneJob's name, in the caller's namespace; what the
FineTuneJob spec cannot say (the model name the caller used, the file ids, the suffix, the
metadata, the hyperparameters as asked, a cancel) is kept in annotations under
`openai.finetune.dev/`. Jobs the API made carry the label `finetune.dev/openai-api: "true"`.

| OpenAI | FineTuneJob |
| --- | --- |
| `model` | `spec.model.source`, through the API's model catalog |
| `training_file` / `validation_file` | `spec.dataset.source` / `spec.dataset.evalSource` (`pvc://<files claim>/files/<id>.jsonl`) |
| `hyperparameters.n_epochs` | `spec.training.epochs` |
| `hyperparameters.batch_size` | `spec.training.perDeviceBatchSize` (gradientAccumulationSteps 1) |
| `hyperparameters.learning_rate_multiplier` | `spec.training.learningRate` = multiplier x the base learning rate |
| `seed` | `spec.training.seed` |
| pause / resume / cancel | `spec.suspend` (cancel also sets the annotation `openai.finetune.dev/cancelled`) |
| `result_files` | `spec.output.resultsFile` (`pvc://<files claim>/results/<id>/results.csv`), read back as a file |
| `trained_tokens` | `status.progress.tokensSeen` |
| checkpoints | `status.checkpoints.kept` |
| `fine_tuned_model` `ft:<model>:<suffix>:<id>` | the adapter `<id>` of the InferenceService in `spec.deploy` |
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ApiError, bad_request

GROUP, VERSION, PLURAL, KIND = "finetune.dev", "v1alpha1", "finetunejobs", "FineTuneJob"
API_LABEL = "finetune.dev/openai-api"
ANNOTATION = "openai.finetune.dev/"
A_MODEL, A_SUFFIX, A_METADATA = ANNOTATION + "model", ANNOTATION + "suffix", ANNOTATION + "metadata"
A_TRAINING_FILE, A_VALIDATION_FILE = ANNOTATION + "training-file", ANNOTATION + "validation-file"
A_HYPERPARAMETERS, A_METHOD = ANNOTATION + "hyperparameters", ANNOTATION + "method"
A_CANCELLED = ANNOTATION + "cancelled"

# spec.training.learningRate's default in the CRD schema (a unit test keeps them equal): what
# learning_rate_multiplier multiplies when the job template sets no learning rate.
DEFAULT_LEARNING_RATE = 2e-4

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
METHODS = ("supervised", "dpo")
# method dpo maps onto spec.method.objective dpo and spec.method.dpo (beta); its data is the
# preference format (OpenAI's input/preferred_output/non_preferred_output lines as they are).
DPO_SUPPORTED = True


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def job_id_for_key(namespace: str, idempotency_key: str) -> str:
    """The job id a create with this Idempotency-Key gets: a retried request finds its job."""
    return "ftjob-" + hashlib.sha256(f"{namespace}\0{idempotency_key}".encode()).hexdigest()[:24]


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def result_file_id(job_id: str) -> str:
    """The id of a job's result file (its results.csv): derived from the job id, so the API
    finds the job of a result file without storing anything."""
    return "file-" + hashlib.sha256(f"results\0{job_id}".encode()).hexdigest()[:24]


def unix(timestamp: Optional[str]) -> Optional[int]:
    if not timestamp:
        return None
    return int(dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())


# --- the create request -----------------------------------------------------------------------


@dataclass
class Hyperparameters:
    """What the caller asked for; "auto" (or absent) leaves the job template's value."""

    n_epochs: Any = "auto"
    batch_size: Any = "auto"
    learning_rate_multiplier: Any = "auto"
    beta: Any = "auto"

    def asked(self, method: str) -> dict:
        out = {"n_epochs": self.n_epochs, "batch_size": self.batch_size,
               "learning_rate_multiplier": self.learning_rate_multiplier}
        if method == "dpo":
            out["beta"] = self.beta
        return out


@dataclass
class CreateJob:
    model: str
    training_file: str
    validation_file: Optional[str] = None
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    method: str = "supervised"
    suffix: Optional[str] = None
    seed: Optional[int] = None
    metadata: dict[str, str] = field(default_factory=dict)


def _number(value: Any, param: str, *, integer: bool, minimum: float, maximum: float) -> Any:
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise bad_request(f"{param} must be \"auto\" or a{'n integer' if integer else ' number'}, "
                          f"got {json.dumps(value)}", param=param)
    if not minimum <= value <= maximum or (value == 0 and minimum == 0):
        raise bad_request(f"{param} must be between {minimum:g} and {maximum:g}, got {value}", param=param)
    return int(value) if integer else float(value)


def _hyperparameters(raw: Any, param: str) -> Hyperparameters:
    if raw is None:
        return Hyperparameters()
    if not isinstance(raw, dict):
        raise bad_request(f"{param} must be an object", param=param)
    known = {"n_epochs", "batch_size", "learning_rate_multiplier", "beta"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise bad_request(f"{param}.{unknown[0]} is not a supported hyperparameter "
                          f"(supported: {', '.join(sorted(known))})", param=f"{param}.{unknown[0]}")
    return Hyperparameters(
        n_epochs=_number(raw.get("n_epochs"), f"{param}.n_epochs", integer=True, minimum=1, maximum=50),
        batch_size=_number(raw.get("batch_size"), f"{param}.batch_size", integer=True, minimum=1, maximum=256),
        learning_rate_multiplier=_number(raw.get("learning_rate_multiplier"),
                                         f"{param}.learning_rate_multiplier", integer=False,
                                         minimum=0, maximum=100),
        beta=_number(raw.get("beta"), f"{param}.beta", integer=False, minimum=0, maximum=2))


def parse_create(body: Any) -> CreateJob:
    """Validate a `POST /v1/fine_tuning/jobs` body; every refusal names its parameter."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    known = {"model", "training_file", "validation_file", "hyperparameters", "method", "suffix",
             "seed", "metadata", "integrations"}
    for key in body:
        if key not in known:
            raise bad_request(f"Unrecognized request argument supplied: {key}", param=key)
    if body.get("integrations"):
        raise bad_request("integrations (Weights & Biases) are not supported; the job's metrics are "
                          "in its events and in Prometheus", param="integrations")
    for key in ("model", "training_file"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise bad_request(f"Missing required parameter: '{key}'", param=key, code="missing_required_parameter")
    for key in ("training_file", "validation_file"):
        if body.get(key) is not None and not (isinstance(body[key], str) and FILE_ID.match(body[key])):
            raise bad_request(f"invalid {key}: {json.dumps(body[key])}", param=key, code=f"invalid_{key}")
    suffix = body.get("suffix")
    if suffix is not None and not (isinstance(suffix, str) and SUFFIX.match(suffix)):
        raise bad_request("suffix must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
                          param="suffix")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**31 - 1):
        raise bad_request("seed must be an integer between 0 and 2147483647", param="seed")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or len(metadata) > 16 or any(
            not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512
            for k, v in metadata.items()):
        raise bad_request("metadata must be at most 16 string pairs (keys up to 64 characters, values "
                          "up to 512)", param="metadata")

    hyper = _hyperparameters(body.get("hyperparameters"), "hyperparameters")
    method_type = "supervised"
    method = body.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type") not in METHODS + ("reinforcement",):
            raise bad_request("method.type must be one of: supervised, dpo", param="method.type")
        method_type = method["type"]
        if method_type == "reinforcement":
            raise bad_request("method.type reinforcement is not supported: this cluster fine-tunes with "
                              "supervised learning (and dpo where the operator supports it)",
                              param="method.type")
        if method_type == "dpo" and not DPO_SUPPORTED:
            raise bad_request("method.type dpo is not supported by this operator version yet "
                              "(it needs FineTuneJob spec.method.objective dpo)", param="method.type")
        section = method.get(method_type) or {}
        if not isinstance(section, dict):
            raise bad_request(f"method.{method_type} must be an object", param=f"method.{method_type}")
        if "hyperparameters" in section:
            if body.get("hyperparameters") is not None:
                raise bad_request("give the hyperparameters either at the top level or in "
                                  f"method.{method_type}.hyperparameters, not both", param="hyperparameters")
            hyper = _hyperparameters(section["hyperparameters"], f"method.{method_type}.hyperparameters")
    if method_type != "dpo" and hyper.beta != "auto":
        raise bad_request("beta is a dpo hyperparameter", param="hyperparameters.beta")
    return CreateJob(model=body["model"], training_file=body["training_file"],
                     validation_file=body.get("validation_file"), hyperparameters=hyper,
                     method=method_type, suffix=suffix, seed=seed, metadata=dict(metadata))


# --- the FineTuneJob the API creates --------------------------------------------------------------


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def server_name(model: str) -> str:
    """The InferenceService serving every adapter trained on `model` in a namespace."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")[:50].strip("-") or "model"
    return f"ft-{slug}"


@dataclass(frozen=True)
class DataFile:
    """A stored upload: its id, the pvc:// location the trainer reads and its record format."""

    id: str
    source: str
    format: str


def build_finetunejob(req: CreateJob, *, job_id: str, namespace: str, model_source: str,
                      template: dict, training: DataFile, validation: Optional[DataFile],
                      results_file: Optional[str] = None, object_storage_secret: Optional[str] = None) -> dict:
    """The FineTuneJob for a create request. `template` is a partial FineTuneJob spec (placement,
    method, defaults) under which the request's own fields are laid. `results_file` (a pvc://
    location on the files claim, or an s3:// one) is where the trainer writes the job's result
    file; `object_storage_secret` names the Secret with the credentials for s3:// uploads."""
    template = copy.deepcopy(template or {})
    train_template = template.get("training") or {}
    hyper = req.hyperparameters
    training_over: dict[str, Any] = {}
    if hyper.n_epochs != "auto":
        training_over["epochs"] = hyper.n_epochs
    if hyper.batch_size != "auto":
        training_over["perDeviceBatchSize"] = hyper.batch_size
        training_over["gradientAccumulationSteps"] = 1
    if hyper.learning_rate_multiplier != "auto":
        base = train_template.get("learningRate", DEFAULT_LEARNING_RATE)
        training_over["learningRate"] = float(f"{base * hyper.learning_rate_multiplier:.6g}")
    if req.seed is not None:
        training_over["seed"] = req.seed
    if hyper.n_epochs != "auto":
        train_template.pop("maxSteps", None)  # an explicit epoch count wins over the template's cap

    dataset: dict[str, Any] = {"source": training.source, "format": training.format}
    if validation is not None:
        dataset.update(evalSource=validation.source, evalFraction=0.0)
    deploy = {"inferenceService": (template.get("deploy") or {}).get("inferenceService") or server_name(req.model)}
    over: dict[str, Any] = {"model": {"source": model_source}, "dataset": dataset,
                            "training": training_over, "deploy": deploy}
    if results_file:
        over["output"] = {"resultsFile": results_file}
    if object_storage_secret:
        over["objectStorage"] = {"secretRef": {"name": object_storage_secret}}
    if req.method == "dpo":
        over["method"] = {"objective": "dpo"}
        if hyper.beta != "auto":
            over["method"]["dpo"] = {"beta": hyper.beta}
        if (train_template.get("packing") or "auto") == "on":
            training_over["packing"] = "auto"  # the API refuses packing on with dpo
    spec = deep_merge(template, over)
    spec.pop("suspend", None)
    annotations = {A_MODEL: req.model, A_TRAINING_FILE: req.training_file,
                   A_HYPERPARAMETERS: json.dumps(hyper.asked(req.method), sort_keys=True),
                   A_METHOD: req.method, A_METADATA: json.dumps(req.metadata, sort_keys=True)}
    if req.suffix:
        annotations[A_SUFFIX] = req.suffix
    if req.validation_file:
        annotations[A_VALIDATION_FILE] = req.validation_file
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": job_id, "namespace": namespace, "labels": {API_LABEL: "true"},
                         "annotations": annotations},
            "spec": spec}


# --- FineTuneJob -> OpenAI objects ------------------------------------------------------------


def fine_tuned_model_name(model: str, suffix: Optional[str], job_id: str) -> str:
    return f"ft:{model}:{suffix or ''}:{job_id}"


def job_id_of_model(model: str) -> Optional[str]:
    """The job id in `ft:<model>:<suffix>:<id>`, or None for any other name (checkpoints included)."""
    if not model.startswith("ft:"):
        return None
    last = model.rsplit(":", 1)[-1]
    return last if JOB_ID.match(last) else None


def openai_status(obj: dict) -> str:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    phase = (obj.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        return phase.lower()
    if annotations.get(A_CANCELLED):
        return "cancelled"
    if (obj.get("spec") or {}).get("suspend"):
        return "paused"
    # phase Suspended with spec.suspend false: resuming, until the operator starts the trainer.
    # Comparing (base vs fine-tuned) and AwaitingApproval (a person approves the deploy) come
    # after training and before the job succeeds: still running in OpenAI's terms.
    return {"Validating": "validating_files", "Training": "running", "Evaluating": "running",
            "Comparing": "running", "AwaitingApproval": "running", "Deploying": "running"}.get(phase, "queued")


TERMINAL = ("succeeded", "failed", "cancelled")


def _int_if_whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _condition(obj: dict, type_: str) -> dict:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def _error(obj: dict) -> Optional[dict]:
    failed = _condition(obj, "Failed")
    reason = failed.get("reason") or "Failed"
    message = failed.get("message") or "the fine-tuning job failed"
    param = "training_file" if reason == "DataValidationFailed" else None
    return {"code": reason, "message": message, "param": param}


def resolved_hyperparameters(obj: dict) -> dict:
    """What the job trains with (the FineTuneJob after defaults), in OpenAI's names."""
    training = (obj.get("spec") or {}).get("training") or {}
    asked = json.loads(((obj.get("metadata") or {}).get("annotations") or {}).get(A_HYPERPARAMETERS) or "{}")
    batch = training.get("perDeviceBatchSize")
    if batch is not None:
        batch *= training.get("gradientAccumulationSteps", 1) * ((obj.get("spec") or {}).get("resources") or {}).get("nodes", 1)
    lrm = asked.get("learning_rate_multiplier", "auto")
    if lrm == "auto" and training.get("learningRate") is not None:
        lrm = float(f"{training['learningRate'] / DEFAULT_LEARNING_RATE:.6g}")
    resolved = {"n_epochs": _int_if_whole(training.get("epochs", asked.get("n_epochs", "auto"))),
                "batch_size": batch if batch is not None else asked.get("batch_size", "auto"),
                "learning_rate_multiplier": lrm}
    method = (obj.get("spec") or {}).get("method") or {}
    if method.get("objective") == "dpo":
        resolved["beta"] = (method.get("dpo") or {}).get("beta", asked.get("beta", "auto"))
    return resolved


def to_job(obj: dict, *, now: Optional[float] = None) -> dict:
    """The `fine_tuning.job` object of a FineTuneJob."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    annotations = meta.get("annotations") or {}
    job_id = meta["name"]
    state = openai_status(obj)
    model = annotations.get(A_MODEL) or spec.get("model", {}).get("source", "")
    suffix = annotations.get(A_SUFFIX)
    method = annotations.get(A_METHOD, "supervised")
    hyper = resolved_hyperparameters(obj)
    now = dt.datetime.now(dt.timezone.utc).timestamp() if now is None else now
    eta = (status.get("progress") or {}).get("etaSeconds")
    finished = unix(status.get("completionTime")) if state in ("succeeded", "failed") else None
    if state == "cancelled":
        finished = unix(annotations.get(A_CANCELLED))
    return {
        "object": "fine_tuning.job",
        "id": job_id,
        "created_at": unix(meta.get("creationTimestamp")) or int(now),
        "model": model,
        "organization_id": meta.get("namespace", ""),
        "status": state,
        "fine_tuned_model": fine_tuned_model_name(model, suffix, job_id) if state == "succeeded" else None,
        "finished_at": finished,
        "error": _error(obj) if state == "failed" else None,
        "hyperparameters": hyper,
        "method": {"type": method, method: {"hyperparameters": hyper}},
        "training_file": annotations.get(A_TRAINING_FILE, ""),
        "validation_file": annotations.get(A_VALIDATION_FILE),
        # The trainer writes results.csv (spec.output.resultsFile) before it exits 0.
        "result_files": [result_file_id(job_id)] if state == "succeeded" and
        (spec.get("output") or {}).get("resultsFile") else [],
        # OpenAI's trained_tokens is null until the job ends: the trainer's count of the
        # non-padding tokens it trained on (every epoch, over all GPUs).
        "trained_tokens": (status.get("progress") or {}).get("tokensSeen") if state in TERMINAL else None,
        "seed": (spec.get("training") or {}).get("seed", 42),
        "suffix": suffix,
        "user_provided_suffix": suffix,
        "metadata": json.loads(annotations.get(A_METADATA) or "{}") or None,
        "estimated_finish": int(now + eta) if state == "running" and eta is not None else None,
        "integrations": [],
    }


def matches_metadata(obj: dict, wanted: dict[str, str]) -> bool:
    have = json.loads(((obj.get("metadata") or {}).get("annotations") or {}).get(A_METADATA) or "{}")
    return all(have.get(k) == v for k, v in wanted.items())


def page(items: list[dict], *, after: Optional[str], limit: int) -> dict:
    """OpenAI's list page: items newest first, those after the id `after`, at most `limit`."""
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def parse_limit(raw: Optional[str], default: int = 20, maximum: int = 100) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"limit must be an integer, got {raw!r}", param="limit") from None
    if not 1 <= value <= maximum:
        raise bad_request(f"limit must be between 1 and {maximum}", param="limit")
    return value


CHECKPOINT_STEP = re.compile(r"checkpoint-(\d+)/?$")
# status.checkpoints.kept[] metrics -> a checkpoint's metrics in OpenAI's names.
CHECKPOINT_METRICS = (("trainLoss", "train_loss"), ("meanTokenAccuracy", "train_mean_token_accuracy"),
                      ("evalLoss", "valid_loss"), ("evalMeanTokenAccuracy", "valid_mean_token_accuracy"))


def _kept_checkpoints(status: dict) -> list[dict]:
    """status.checkpoints.kept, or for a status written before the trainer reported it, the
    latest and best checkpoints (with the latest metrics for the one at the current step)."""
    checkpoints = status.get("checkpoints") or {}
    if checkpoints.get("kept"):
        return checkpoints["kept"]
    metrics, progress = status.get("metrics") or {}, status.get("progress") or {}
    steps = {int(m.group(1)) for path in (checkpoints.get("latest"), checkpoints.get("best"))
             if path and (m := CHECKPOINT_STEP.search(path))}
    return [{"step": step, **({k: metrics[k] for k in ("trainLoss", "evalLoss") if k in metrics}
                              if step == progress.get("step") else {})} for step in sorted(steps)]


def to_checkpoints(obj: dict) -> list[dict]:
    """`fine_tuning.job.checkpoint` objects for every complete checkpoint the job keeps, newest first."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    annotations = meta.get("annotations") or {}
    job_id = meta["name"]
    model = fine_tuned_model_name(annotations.get(A_MODEL, ""), annotations.get(A_SUFFIX), job_id)
    started = unix(status.get("startTime")) or unix(meta.get("creationTimestamp")) or 0
    out = []
    for kept in sorted(_kept_checkpoints(status), key=lambda k: k["step"], reverse=True):
        step = kept["step"]
        metrics: dict[str, Any] = {"step": float(step)}
        metrics.update({theirs: kept[ours] for ours, theirs in CHECKPOINT_METRICS if ours in kept})
        out.append({"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job_id[6:]}-{step}",
                    "created_at": unix(kept.get("savedAt")) or started, "fine_tuning_job_id": job_id,
                    "step_number": step, "fine_tuned_model_checkpoint": f"{model}:ckpt-step-{step}",
                    "metrics": metrics})
    return out


def to_events(obj: dict, kube_events: list[dict], *, now: Optional[float] = None) -> list[dict]:
    """`fine_tuning.job.event` objects, newest first: the FineTuneJob's Kubernetes events, its
    creation, and its latest training metrics."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    job_id = meta["name"]
    created = unix(meta.get("creationTimestamp")) or 0
    events = [{"object": "fine_tuning.job.event", "id": f"ftevent-{job_id[6:]}-created", "created_at": created,
               "level": "info", "message": "Created fine-tuning job", "type": "message", "data": {}}]
    for e in kube_events:
        when = unix(e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp")
                    or (e.get("metadata") or {}).get("creationTimestamp")) or created
        reason = e.get("reason") or ""
        level = "warn" if e.get("type") == "Warning" else "info"
        if reason in ("Failed", "DataValidationFailed") or (e.get("type") == "Warning" and "Failed" in reason):
            level = "error"
        events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{e['metadata']['uid']}",
                       "created_at": when, "level": level,
                       "message": f"{reason}: {e.get('message', '')}" if reason else e.get("message", ""),
                       "type": "message", "data": {"reason": reason, "count": e.get("count", 1)}})
    progress, metrics = status.get("progress") or {}, status.get("metrics") or {}
    if progress.get("step"):
        data = {"step": progress["step"], "total_steps": progress.get("totalSteps")}
        for ours, theirs in (("trainLoss", "train_loss"), ("evalLoss", "valid_loss"),
                             ("learningRate", "learning_rate"), ("tokensPerSecond", "tokens_per_second")):
            if ours in metrics:
                data[theirs] = metrics[ours]
        loss = f", train loss={metrics['trainLoss']:.4f}" if "trainLoss" in metrics else ""
        events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{job_id[6:]}-step-{progress['step']}",
                       "created_at": int(dt.datetime.now(dt.timezone.utc).timestamp() if now is None else now),
                       "level": "info", "type": "metrics", "data": data,
                       "message": f"Step {progress['step']}/{progress.get('totalSteps', '?')}{loss}"})
    state = openai_status(obj)
    if state in TERMINAL:
        text = {"succeeded": "The job has successfully completed",
                "failed": f"The job failed: {(_error(obj) or {}).get('message', '')}",
                "cancelled": "The job was cancelled"}[state]
        end = unix(status.get("completionTime")) if state != "cancelled" else unix(
            (meta.get("annotations") or {}).get(A_CANCELLED))
        events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{job_id[6:]}-{state}",
                       "created_at": end or created, "level": "error" if state == "failed" else "info",
                       "message": text, "type": "message", "data": {}})
    events.sort(key=lambda e: (e["created_at"], _event_rank(e)), reverse=True)
    return events


def _event_rank(event: dict) -> int:
    # Within one second: creation first, then Kubernetes events, metrics, the final message.
    eid = event["id"]
    if eid.endswith("-created"):
        return 0
    if eid.endswith(("-succeeded", "-failed", "-cancelled")):
        return 3
    return 2 if event["type"] == "metrics" else 1


def require_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise ApiError(404, f"No such fine-tuning job: '{job_id}'", code="fine_tuning_job_not_found",
                       param="fine_tuning_job_id")
    return job_id
