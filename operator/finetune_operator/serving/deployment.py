"""The vLLM Deployment of an InferenceService (pure): a typed InferenceService and the
FineTuneJobs it names in, a dict out.

Where things are inside the vLLM pod:

| source | mounted at | served from |
| --- | --- | --- |
| adapter of FineTuneJob `j` | its claim (`<j>-workspace` or `storage.existingClaim`), read-only, at `/adapters/<claim>` (one volume per claim, however many jobs share it) | `/adapters/<claim>/artifacts/adapter` (`/adapters/<claim>/jobs/<j>/artifacts/adapter` on a shared existingClaim) |
| merged model of FineTuneJob `j` | its claim, read-only, at `/models/<claim>` | `/models/<claim>/artifacts/merged` (likewise under `jobs/<j>/`) |
| `pvc://<claim>/<path>` | the claim, read-only, at `/mnt/pvc/<claim>` | `/mnt/pvc/<claim>/<path>` |
| `org/name`, `hf://org/name` | (downloaded by vLLM into `$HOME/.cache`) | the hub id |
| `/absolute/path` | (inside the image) | the path |

Security context: restricted (non-root uid 1000, no privilege escalation, every capability
dropped, RuntimeDefault seccomp). Exception: the root filesystem stays writable, because
vLLM, torch.compile and Triton write kernel and model caches under `$HOME` and `/tmp`;
`$HOME` is an emptyDir so the image needs no user of its own.

Adapters are not in the pod template: vLLM runs with `--enable-lora` (unless it serves a
merged model) and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, and the operator loads the spec's
adapters into each ready replica at run time (`serving/adapters.py`). The pod template carries
`finetune.dev/revision`, a hash of what needs a restart (command, volumes, resources, and the
identity of a merged model's FineTuneJob): a new base or merged model, new vLLM arguments,
resources, or an adapter on a claim no volume mounts yet change it and roll the Deployment
out, with maxUnavailable 0. Jobs that deploy into one server should share a claim
(`storage.existingClaim`) so that a new one adds no volume and restarts nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Mapping, Optional

from finetune_api.layout import ADAPTER, ARTIFACTS, MERGED, job_folder, under
from finetune_api.models import VLLM, FineTuneJob, InferenceService
from finetune_api.sources import PVC, hub_id, parse_source

from finetune_operator import names
from finetune_operator.builders.placement import GPU_RESOURCE as GPU
from finetune_operator.builders.placement import place
from finetune_operator.builders.storage import claim_name
from finetune_operator.serving.adapters import RUNTIME_LORA_ENV
from finetune_operator.serving.common import (
    PORT, PORT_NAME, REVISION_ANNOTATION, labels, meta, selector, served_model_name,
)

# The operator's --vllm-image default (settings.OperatorConfig.vllm_image); spec.vllm.image wins.
DEFAULT_IMAGE = "vllm/vllm-openai:v0.32.0"
CONTAINER = "vllm"
ADAPTER_ARTIFACT = ADAPTER
MERGED_ARTIFACT = MERGED
CHAT_TEMPLATE_ARTIFACT = f"{ARTIFACTS}/chat_template.jinja"  # chat_templates.ARTIFACT, by the trainer
HOME = "/home/vllm"
RUN_AS = 1000
# Model loading may take long (download, weights, CUDA graphs): 20 minutes before liveness,
# probed every second, so that the pod is Ready within a second of vLLM answering /health
# (a 10 s period left the server unused for up to 10 s after it was up: issue #14). A refused
# connection, which is what the probe gets until vLLM listens, costs nothing.
STARTUP_PERIOD, STARTUP_FAILURES, STARTUP_TIMEOUT = 1, 1200, 2
# Longer than the startup budget, so a slow but healthy start is not called stuck.
PROGRESS_DEADLINE = STARTUP_PERIOD * STARTUP_FAILURES + 600


# --- where things are -------------------------------------------------------------------------


def _volume_name(prefix: str, key: str) -> str:
    return names.shorten(re.sub(r"[^a-z0-9-]", "-", f"{prefix}-{key}".lower()), hash_of=key)


class _Layout:
    """Collects the volumes and mounts the sources need, and where each source ends up."""

    def __init__(self) -> None:
        self.volumes: dict[str, dict] = {}
        self.mounts: dict[str, dict] = {}

    def _claim(self, volume: str, claim: str, mount_path: str) -> None:
        self.volumes[volume] = {"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        self.mounts[volume] = {"name": volume, "mountPath": mount_path, "readOnly": True}

    def job_artifact(self, job: FineTuneJob, root: str, artifact: str) -> str:
        claim = claim_name(job)
        self._claim(_volume_name(f"ftj-{root.strip('/')}", claim), claim, f"{root}/{claim}")
        own = job_folder(job.metadata.name, shared_claim=bool(job.spec.storage.existing_claim))
        return under(f"{root}/{claim}", under(own, artifact) if own else artifact)

    def source(self, location: str) -> str:
        source = parse_source(location)
        if source.scheme == PVC:
            claim, sub = source.authority, source.path
            self._claim(_volume_name("pvc", claim), claim, f"/mnt/pvc/{claim}")
            return f"/mnt/pvc/{claim}/{sub}".rstrip("/")
        return hub_id(location) or location


def _resolve(isvc: InferenceService, jobs: Mapping[str, FineTuneJob],
             keep: Mapping[str, FineTuneJob] | None = None) -> tuple[str, list[tuple[str, str]], _Layout]:
    """(model path or hub id, [(adapter name, path)], layout). `keep`: jobs no longer in the
    spec whose adapters still serve (the current version of a gated adapter, promotion.py):
    their claims stay mounted."""
    layout = _Layout()
    for job in (keep or {}).values():
        layout.job_artifact(job, "/adapters", ADAPTER_ARTIFACT)
    merged = isvc.spec.merged_model
    if merged and merged.fine_tune_job_ref:
        model = layout.job_artifact(jobs[merged.fine_tune_job_ref.name], "/models", MERGED_ARTIFACT)
    elif merged and merged.path:
        model = layout.source(merged.path)
    else:
        model = layout.source(isvc.spec.model.source)
    adapters = []
    for adapter in isvc.spec.adapters:
        if adapter.fine_tune_job_ref:
            path = layout.job_artifact(jobs[adapter.fine_tune_job_ref.name], "/adapters", ADAPTER_ARTIFACT)
        else:
            path = layout.source(adapter.path)
        adapters.append((adapter.name, path))
    return model, adapters, layout


def adapter_paths(isvc: InferenceService, jobs: Mapping[str, FineTuneJob]) -> list[str]:
    """Where a pod of this server reads each of spec.adapters (in spec order)."""
    return [path for _, path in _resolve(isvc, jobs)[1]]


def job_adapter_path(job: FineTuneJob) -> str:
    """Where a pod of a server reads the adapter of FineTuneJob `job`."""
    return _Layout().job_artifact(job, "/adapters", ADAPTER_ARTIFACT)


# --- the vLLM command -------------------------------------------------------------------------


def vllm_command(isvc: InferenceService, jobs: Mapping[str, FineTuneJob]) -> list[str]:
    """The container's command: vLLM's OpenAI server as a list (never through a shell).

    `python -m vllm.entrypoints.openai.api_server`, not the `vllm` console script, which
    fails in the CPU build (it looks up a distribution named `vllm`).
    """
    model, _, layout = _resolve(isvc, jobs)
    return _command(isvc, model, _chat_template(isvc, jobs, layout))


def _chat_template(isvc: InferenceService, jobs: Mapping[str, FineTuneJob], layout: _Layout) -> str | None:
    """`--chat-template` for adapters trained with another template than the base model's own
    (dataset.chatTemplate name or file): the first such job's artifacts/chat_template.jinja,
    in spec order. A merged model carries its template in its tokenizer files. Adapters of
    one server trained with different templates cannot all be served right: the prompt check
    (promptcheck.py) reports it."""
    if isvc.spec.merged_model:
        return None
    for adapter in isvc.spec.adapters:
        job = jobs.get(adapter.fine_tune_job_ref.name) if adapter.fine_tune_job_ref else None
        choice = job.spec.dataset.chat_template if job else None
        if choice and (choice.file or choice.name != "model"):
            return layout.job_artifact(job, "/adapters", CHAT_TEMPLATE_ARTIFACT)
    return None


def uses_lora(isvc: InferenceService) -> bool:
    """Whether vLLM runs with LoRA enabled: always, unless it serves a merged model (adapters
    may be added to a running server, so this does not depend on spec.adapters)."""
    return isvc.spec.merged_model is None


def _command(isvc: InferenceService, model: str, chat_template: str | None = None) -> list[str]:
    spec = isvc.spec
    vllm = spec.vllm or VLLM()
    cmd = ["python", "-m", "vllm.entrypoints.openai.api_server",
           "--model", model,
           "--served-model-name", served_model_name(isvc),
           "--port", str(PORT), "--host", "0.0.0.0"]
    uses_hub = hub_id(spec.model.source) is not None and not spec.merged_model
    if uses_hub and spec.model.revision:
        cmd += ["--revision", spec.model.revision]
    if spec.model.trust_remote_code:
        cmd += ["--trust-remote-code"]
    if uses_lora(isvc):
        cmd += ["--enable-lora", "--max-lora-rank", str(vllm.max_lora_rank), "--max-loras", str(vllm.max_loras)]
    if vllm.max_model_len:
        cmd += ["--max-model-len", str(vllm.max_model_len)]
    if chat_template:
        cmd += ["--chat-template", chat_template]
    cmd += ["--dtype", vllm.dtype,
            "--gpu-memory-utilization", str(vllm.gpu_memory_utilization),
            "--tensor-parallel-size", str(vllm.tensor_parallel_size)]
    # The kubelet expands $(VAR) in command and args (and $$ to $): escaping every $ keeps
    # user strings literal, so "$(HF_TOKEN)" cannot pull a Secret's value into vLLM's argv.
    return cmd + [arg.replace("$", "$$") for arg in vllm.extra_args]


# --- the Deployment ---------------------------------------------------------------------------


def _resources(isvc: InferenceService) -> dict:
    r = isvc.spec.resources
    amounts = {}
    if r.cpu:
        amounts["cpu"] = str(r.cpu)
    if r.memory:
        amounts["memory"] = str(r.memory)
    limits = dict(amounts)
    if r.gpus > 0:
        limits[GPU] = str(r.gpus)
    out = {}
    if amounts:
        out["requests"] = amounts
    if limits:
        out["limits"] = limits
    return out


def _memory_gib(quantity: Optional[str]) -> Optional[float]:
    if not quantity:
        return None
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix, mult in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * mult / 2**30
    return float(quantity) / 2**30


def _env(isvc: InferenceService) -> list[dict]:
    env = [{"name": "HOME", "value": HOME}]
    if uses_lora(isvc):
        env.append({"name": RUNTIME_LORA_ENV, "value": "True"})  # adapters are loaded at run time
    ref = isvc.spec.model.token_secret_ref
    if ref:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if isvc.spec.resources.gpus == 0:
        # The CPU build reserves VLLM_CPU_KVCACHE_SPACE GiB (default 4) for the KV cache:
        # a quarter of the memory limit, at least 1 GiB.
        gib = _memory_gib(isvc.spec.resources.memory)
        env.append({"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(max(1, int(gib // 4)) if gib else 1)})
    return env


def _probe(path: str, period: int, failures: int, timeout: int = 5) -> dict:
    return {"httpGet": {"path": path, "port": PORT_NAME}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": timeout}


def _pod_spec(isvc: InferenceService, command: list[str], layout: _Layout, default_image: str) -> dict:
    r = isvc.spec.resources
    volumes = [{"name": "home", "emptyDir": {}}]
    mounts = [{"name": "home", "mountPath": HOME}]
    # More shared memory than a container's 64 MiB /dev/shm: vLLM's engine allocates a 160 MiB
    # shared-memory ring buffer even on CPU (it exits otherwise), and NCCL needs it on GPUs.
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    volumes += [layout.volumes[k] for k in sorted(layout.volumes)]
    mounts += [layout.mounts[k] for k in sorted(layout.mounts)]
    container = {
        "name": CONTAINER,
        "image": (isvc.spec.vllm.image if isvc.spec.vllm and isvc.spec.vllm.image else default_image),
        "command": command,
        "env": _env(isvc),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "startupProbe": _probe("/health", STARTUP_PERIOD, STARTUP_FAILURES, STARTUP_TIMEOUT),
        "readinessProbe": _probe("/health", 5, 3),
        "livenessProbe": _probe("/health", 10, 3),
        "resources": _resources(isvc),
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
    }
    return place(pod, gpus=r.gpus, node_selector=r.node_selector, tolerations=r.tolerations,
                 affinity=r.affinity, priority_class_name=r.priority_class_name)


def revision(isvc: InferenceService, jobs: Mapping[str, FineTuneJob],
             default_image: str = DEFAULT_IMAGE) -> str:
    """Hash of what the pods serve: changes exactly when a rollout is needed."""
    return _revision(_unrevisioned_pod_spec(isvc, jobs, default_image), isvc, jobs)


def _unrevisioned_pod_spec(isvc: InferenceService, jobs: Mapping[str, FineTuneJob],
                           default_image: str, keep: Mapping[str, FineTuneJob] | None = None) -> dict:
    model, _, layout = _resolve(isvc, jobs, keep)
    return _pod_spec(isvc, _command(isvc, model, _chat_template(isvc, jobs, layout)), layout, default_image)


def _revision(pod_spec: dict, isvc: InferenceService, jobs: Mapping[str, FineTuneJob]) -> str:
    # A FineTuneJob recreated under the same name writes a new merged model to the same path:
    # its uid tells the versions apart (a job's own spec cannot change once it trained). Not
    # its completion time: that is set only once the server already serves the model, and would
    # roll every server out a second time. Adapters' jobs are not here: a new adapter version
    # is loaded at run time (serving/adapters.py).
    merged = isvc.spec.merged_model
    merged_job = merged.fine_tune_job_ref.name if merged and merged.fine_tune_job_ref else None
    results = {name: [job.metadata.uid, job.status.artifacts.merged if job.status.artifacts else None]
               for name, job in sorted(jobs.items()) if name == merged_job}
    blob = json.dumps({"pod": pod_spec, "jobs": results}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_deployment(isvc: InferenceService, jobs: Mapping[str, FineTuneJob],
                     default_image: str = DEFAULT_IMAGE, keep: Mapping[str, FineTuneJob] | None = None) -> dict:
    """The vLLM Deployment; `jobs` holds every FineTuneJob the spec references (checked).
    `default_image` is the operator's --vllm-image, used unless spec.vllm.image is set.
    `keep`: jobs whose adapters serve though the spec names another version (promotion.py)."""
    pod_spec = _unrevisioned_pod_spec(isvc, jobs, default_image, keep)
    rev = _revision(pod_spec, isvc, jobs)
    spec = {
        "selector": {"matchLabels": selector(isvc)},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "progressDeadlineSeconds": PROGRESS_DEADLINE,
        "revisionHistoryLimit": 3,
        "template": {
            "metadata": {
                "labels": labels(isvc),
                "annotations": {REVISION_ANNOTATION: rev, "prometheus.io/scrape": "true",
                                "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"},
            },
            "spec": pod_spec,
        },
    }
    if isvc.spec.autoscaling is None:
        spec["replicas"] = isvc.spec.replicas  # left to the autoscaler otherwise
    metadata = meta(isvc)
    metadata["annotations"] = {REVISION_ANNOTATION: rev}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}
