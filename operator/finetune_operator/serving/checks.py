"""What may be served: checks an InferenceService against the FineTuneJobs it names. Pure
functions; the handler gathers their inputs.

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

from finetune_api.models import FineTuneJob, InferenceService
from finetune_api.sources import HTTPS, S3, hub_id, parse_source

from finetune_operator.serving.common import referenced_jobs, served_model_name
from finetune_operator.status import Phase

# A FineTuneJob's artifacts are on its volume once training and evaluation are done:
# `Deploying` is the job waiting on this server, `Succeeded` the job finished.
SERVABLE_JOB_PHASES = (Phase.DEPLOYING, Phase.SUCCEEDED)

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


def check(isvc: InferenceService, jobs: Mapping[str, Optional[FineTuneJob]]) -> list[Problem]:
    """Every reason `isvc` cannot be served now; `jobs` maps referenced names to the job or None."""
    spec = isvc.spec
    problems: list[Problem] = []
    max_rank = spec.vllm.max_lora_rank if spec.vllm else 16
    for source, where in _sources(isvc):
        if parse_source(source).scheme in (S3, HTTPS):
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
