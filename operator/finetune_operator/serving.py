"""What may be served: checks an InferenceService against the FineTuneJobs it names, and
reads the state of its rollout. Pure functions; the handler gathers their inputs.

Bad input is refused here, with a condition a person can act on, before a vLLM pod could
crash-loop on it (vLLM rejects an adapter whose rank exceeds `--max-lora-rank`, adapters
with `modules_to_save`, and an adapter trained on another base model gives garbage).

The operator cannot read a job's volume in a cluster, so for FineTuneJob references the
rank comes from the job's spec (`method.lora.r`); `check_adapter_dir` reads a real
adapter folder (`adapter_config.json`) for tests and the demo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from finetune_api.sources import hub_id
from finetune_api.models import FineTuneJob, InferenceService

# The pod template annotation that names the served configuration (see builders.inference).
REVISION_ANNOTATION = "finetune.dev/revision"

# Phases of an InferenceService.
PENDING, PROGRESSING, READY, DEGRADED, FAILED = "Pending", "Progressing", "Ready", "Degraded", "Failed"

# A FineTuneJob's artifacts are on its volume once training and evaluation are done:
# `Deploying` is the job waiting on this server, `Succeeded` the job finished.
SERVABLE_JOB_PHASES = ("Deploying", "Succeeded")

# Flags the operator sets itself (or that would break the pod's contract: the port the
# probes and the Service use, the names clients use, the adapters mounted from volumes).
DENIED_FLAGS = {
    "--model": "spec.model.source",
    "--served-model-name": "spec.vllm.servedModelName",
    "--port": None,
    "--host": None,
    "--uds": None,
    "--api-key": None,
    "--ssl-keyfile": None,
    "--ssl-certfile": None,
    "--ssl-ca-certs": None,
    "--root-path": None,
    "--config": None,
    "--lora-modules": "spec.adapters",
    "--enable-lora": "spec.adapters",
    "--max-lora-rank": "spec.vllm.maxLoraRank",
    "--max-loras": "spec.vllm.maxLoras",
    "--max-model-len": "spec.vllm.maxModelLen",
    "--dtype": "spec.vllm.dtype",
    "--gpu-memory-utilization": "spec.vllm.gpuMemoryUtilization",
    "--tensor-parallel-size": "spec.vllm.tensorParallelSize",
    "-tp": "spec.vllm.tensorParallelSize",
    "--revision": "spec.model.revision",
    "--trust-remote-code": "spec.model.trustRemoteCode",
    "--disable-log-stats": None,  # the /metrics the autoscaler and dashboards read
}
# Container restarts after which a pod that is not ready counts as crash-looping (the
# local node reports restarts but no CrashLoopBackOff reason).
CRASH_LOOP_RESTARTS = 2
STUCK_WAITING_REASONS = ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull",
                         "CreateContainerConfigError", "CreateContainerError", "InvalidImageName")


@dataclass(frozen=True)
class Problem:
    """Why the spec cannot be served; `waiting` problems may resolve by themselves."""

    reason: str
    message: str
    waiting: bool = False


def same_model(a: str, b: str) -> bool:
    """`org/name` and `hf://org/name` name the same model; trailing slashes do not matter."""
    return (hub_id(a) or a).rstrip("/") == (hub_id(b) or b).rstrip("/")


def check_extra_args(args: list[str]) -> list[str]:
    """Messages for every extra vLLM argument that would break the contract (empty: fine)."""
    problems = []
    for i, arg in enumerate(args):
        where = f"spec.vllm.extraArgs[{i}]"
        if any(c in arg for c in "\n\r\0"):
            problems.append(f"{where}: values must not contain newlines or NUL characters")
            continue
        if arg.startswith("@"):
            problems.append(f"{where}: {arg!r}: argument files are not allowed")
            continue
        if not arg.startswith("-"):
            continue
        flag = arg.split("=", 1)[0].lower()
        flag = "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag
        # argparse accepts unambiguous prefixes, so `--mod` would mean `--model`.
        denied = [d for d in DENIED_FLAGS if d == flag or (len(flag) > 3 and d.startswith(flag))]
        for name in denied[:1]:
            field = DENIED_FLAGS[name]
            hint = f"; use {field}" if field else "; the operator sets it (probes, Service and clients rely on it)"
            problems.append(f"{where}: {arg!r} is not allowed{hint}")
    return problems


def check_adapter_dir(path: str | Path, server_model: str, max_lora_rank: int) -> list[str]:
    """Messages for every reason vLLM would refuse (or misuse) the PEFT adapter in `path`.

    Reads `adapter_config.json`: the rank must not exceed the server's `--max-lora-rank`,
    vLLM cannot load `modules_to_save` (nor an adapter of `lm_head`), and the adapter must
    have been trained on the server's base model.
    """
    config_path = Path(path) / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        return [f"{config_path}: not found; is {path} a PEFT adapter folder (save_pretrained)?"]
    except json.JSONDecodeError as e:
        return [f"{config_path}: not valid JSON ({e})"]
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"{config_path}: peft_type {config.get('peft_type')!r}; vLLM serves LoRA adapters only")
    rank = int(config.get("r") or 0)
    if rank > max_lora_rank:
        problems.append(f"{config_path}: LoRA rank {rank} exceeds the server's maxLoraRank "
                        f"{max_lora_rank}; raise spec.vllm.maxLoraRank to at least {rank}")
    saved = config.get("modules_to_save") or []
    if saved:
        problems.append(f"{config_path}: modules_to_save {sorted(saved)} cannot be served by vLLM; "
                        "train without modules_to_save or merge the adapter (output.merge)")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    if "lm_head" in targets:
        problems.append(f"{config_path}: target_modules includes lm_head, which vLLM cannot serve; "
                        "merge the adapter (output.merge) instead")
    base = config.get("base_model_name_or_path")
    if base and not same_model(str(base), server_model) and not _same_local_model(str(base), server_model):
        problems.append(f"{config_path}: trained on {base!r} but the server's model is {server_model!r}")
    return problems


def _same_local_model(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def referenced_jobs(isvc: InferenceService) -> list[str]:
    """Names of the FineTuneJobs the spec reads (adapters first, then the merged model)."""
    names = [a.fine_tune_job_ref.name for a in isvc.spec.adapters if a.fine_tune_job_ref]
    merged = isvc.spec.merged_model
    if merged and merged.fine_tune_job_ref:
        names.append(merged.fine_tune_job_ref.name)
    return list(dict.fromkeys(names))


def served_model_name(isvc: InferenceService) -> str:
    """spec.vllm.servedModelName, else the object's name, else (when an adapter already has
    that name, as when a FineTuneJob deploys to an InferenceService of its own name) `<name>-base`."""
    vllm = isvc.spec.vllm
    if vllm and vllm.served_model_name:
        return vllm.served_model_name
    name = isvc.metadata.name
    return f"{name}-base" if any(a.name == name for a in isvc.spec.adapters) else name


def check(isvc: InferenceService, jobs: Mapping[str, Optional[FineTuneJob]]) -> list[Problem]:
    """Every reason `isvc` cannot be served now; `jobs` maps referenced names to the job or None."""
    spec = isvc.spec
    problems: list[Problem] = []
    max_rank = spec.vllm.max_lora_rank if spec.vllm else 16
    for source, where in _sources(isvc):
        if source.startswith(("s3://", "https://")):
            problems.append(Problem("UnsupportedSource", f"{where}: {source!r}: vLLM cannot load from "
                                    "s3:// or https:// here; copy it to a claim (pvc://) or use a "
                                    "Hugging Face id"))
    if spec.vllm:
        problems += [Problem("InvalidExtraArgs", m) for m in check_extra_args(spec.vllm.extra_args)]
    base_name = served_model_name(isvc)
    for i, adapter in enumerate(spec.adapters):
        where = f"spec.adapters[{i}] ({adapter.name})"
        if adapter.name == base_name:
            problems.append(Problem("AdapterNameConflict", f"{where}: the name is the base model's "
                                    "served name; pick another adapter name"))
        if not adapter.fine_tune_job_ref:
            continue
        job_name = adapter.fine_tune_job_ref.name
        job = jobs.get(job_name)
        waiting = _waiting_for(job, job_name, where)
        if waiting:
            problems.append(waiting)
            continue
        if not job.spec.method.uses_adapter:
            problems.append(Problem("AdapterFromFullFineTuning", f"{where}: FineTuneJob {job_name} did "
                                    "full fine-tuning and has no adapter; serve it with "
                                    "spec.mergedModel.fineTuneJobRef instead"))
            continue
        rank = job.spec.method.lora.r
        if rank > max_rank:
            problems.append(Problem("LoraRankTooHigh", f"{where}: FineTuneJob {job_name} trained LoRA "
                                    f"rank {rank} but spec.vllm.maxLoraRank is {max_rank}; raise "
                                    f"spec.vllm.maxLoraRank to at least {rank}"))
        if not same_model(job.spec.model.source, spec.model.source):
            problems.append(Problem("BaseModelMismatch", f"{where}: FineTuneJob {job_name} trained on "
                                    f"{job.spec.model.source!r} but this server's model is "
                                    f"{spec.model.source!r}; an adapter only works on its own base model"))
        elif job.spec.model.revision and spec.model.revision and job.spec.model.revision != spec.model.revision:
            problems.append(Problem("BaseModelMismatch", f"{where}: FineTuneJob {job_name} trained on "
                                    f"revision {job.spec.model.revision!r} but this server serves "
                                    f"revision {spec.model.revision!r}"))
    merged = spec.merged_model
    if merged and merged.fine_tune_job_ref:
        job_name = merged.fine_tune_job_ref.name
        job = jobs.get(job_name)
        waiting = _waiting_for(job, job_name, "spec.mergedModel")
        if waiting:
            problems.append(waiting)
        elif job.spec.method.uses_adapter and not job.spec.output.merge:
            problems.append(Problem("NoMergedModel", f"spec.mergedModel: FineTuneJob {job_name} wrote "
                                    "only an adapter (output.merge is false); serve it in spec.adapters "
                                    "or set output.merge on the job"))
    return problems


def _waiting_for(job: Optional[FineTuneJob], name: str, where: str) -> Optional[Problem]:
    if job is None:
        return Problem("FineTuneJobNotFound", f"{where}: FineTuneJob {name} does not exist (yet)", True)
    phase = job.status.phase or "Pending"
    if phase not in SERVABLE_JOB_PHASES:
        return Problem("FineTuneJobNotSucceeded", f"{where}: FineTuneJob {name} is {phase}; its "
                       "artifacts are served once it succeeds", True)
    return None


def _sources(isvc: InferenceService) -> list[tuple[str, str]]:
    spec = isvc.spec
    out = [(spec.model.source, "spec.model.source")]
    out += [(a.path, f"spec.adapters[{i}].path") for i, a in enumerate(spec.adapters) if a.path]
    if spec.merged_model and spec.merged_model.path:
        out.append((spec.merged_model.path, "spec.mergedModel.path"))
    return out


# --- rollout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    phase: str
    reason: str
    message: str
    replicas: int = 0
    ready_replicas: int = 0


def rollout(deployment: Optional[dict], pods: list[dict], revision: str) -> Rollout:
    """The state of the Deployment's rollout to `revision` (the pod template annotation).

    A rollout that cannot finish (the Deployment's progress deadline passed, or pods of the
    new revision crash-loop) is Degraded: the old ReplicaSet keeps serving meanwhile, since
    maxUnavailable is 0.
    """
    if deployment is None:
        return Rollout(PROGRESSING, "Creating", "creating the vLLM Deployment")
    spec, status = deployment.get("spec", {}), deployment.get("status", {})
    desired = spec.get("replicas", 1)
    ready = status.get("readyReplicas", 0) or 0
    counts = {"replicas": status.get("replicas", 0) or 0, "ready_replicas": ready}
    serving = f"{ready} ready replica(s) keep serving" if ready else "no replica is serving"
    for pod in pods:
        if pod.get("metadata", {}).get("annotations", {}).get(REVISION_ANNOTATION) != revision:
            continue
        crash = _crash_looping(pod)
        if crash:
            return Rollout(DEGRADED, "CrashLoop", f"pod {pod['metadata']['name']} of revision "
                           f"{revision}: {crash}; {serving}", **counts)
    progressing = next((c for c in status.get("conditions", []) if c.get("type") == "Progressing"), None)
    if progressing and progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Rollout(DEGRADED, "ProgressDeadlineExceeded", f"{progressing.get('message', '')}; {serving}",
                       **counts)
    generation = deployment.get("metadata", {}).get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return Rollout(PROGRESSING, "RollingUpdate", "the Deployment controller has not seen the new spec yet",
                       **counts)
    updated = status.get("updatedReplicas", 0) or 0
    available = status.get("availableReplicas", 0) or 0
    total = status.get("replicas", 0) or 0
    # The Deployment's counters can lag its ReplicaSets for a moment after a template change:
    # count the ready pods of this revision too before calling it done.
    new_ready = sum(1 for p in pods
                    if p.get("metadata", {}).get("annotations", {}).get(REVISION_ANNOTATION) == revision
                    and not p.get("metadata", {}).get("deletionTimestamp")
                    and _pod_ready(p))
    if (updated >= desired and available >= desired and total == updated and ready >= desired
            and new_ready >= desired):
        if desired == 0:
            return Rollout(READY, "ScaledToZero", "no replicas are requested", **counts)
        return Rollout(READY, "RolloutComplete", f"{ready}/{desired} replicas ready on revision {revision}",
                       **counts)
    return Rollout(PROGRESSING, "RollingUpdate", f"{updated}/{desired} replicas updated to revision "
                   f"{revision}, {available} available; {serving}", **counts)


def _pod_ready(pod: dict) -> bool:
    status = pod.get("status", {})
    conditions = status.get("conditions") or []
    if conditions:
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    containers = status.get("containerStatuses") or []
    return bool(containers) and all(c.get("ready") for c in containers)


def _crash_looping(pod: dict) -> Optional[str]:
    for cs in pod.get("status", {}).get("containerStatuses", []) or []:
        waiting = cs.get("state", {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING_REASONS:
            return f"container {cs['name']} is in {waiting['reason']} ({waiting.get('message', '')})"
        restarts = cs.get("restartCount", 0) or 0
        if restarts >= CRASH_LOOP_RESTARTS and not cs.get("ready"):
            last = (cs.get("lastState", {}) or {}).get("terminated") or cs.get("state", {}).get("terminated") or {}
            detail = f" (last exit code {last['exitCode']})" if "exitCode" in last else ""
            return f"container {cs['name']} restarted {restarts} times{detail}"
    return None

