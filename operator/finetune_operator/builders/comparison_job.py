"""The comparison Job: after the trainer Job completed, one pod from the vLLM image runs
`python -m finetune_trainer compare` with the trainer's config, serving the base model and
the result side by side through vLLM (see `finetune_trainer/compare.py`). It writes
`artifacts/comparison.json` on the job volume and patches `status.comparison` with the
trainer's ServiceAccount (the same least-privilege Role: its own job's status only).

The pod is the trainer's pod template (volume, config, identity, placement, security)
with its own container: the vLLM image, the compare command, at most one GPU. A compare run
that cannot start vLLM still exits 0 and reports `state: Unavailable`; the Job's one retry
is for crashes.
"""

from __future__ import annotations

from finetune_api.models import FineTuneJob

from finetune_operator import names
from finetune_operator.builders import object_meta
from finetune_operator.builders.placement import GPU_RESOURCE
from finetune_operator.builders.trainer_config import CONFIG_PATH, MODEL_TOKEN_ENV
from finetune_operator.builders.trainer_job import build_pod_template
from finetune_operator.labels import labels_for

COMPONENT = "comparison"
CONTAINER = "compare"
BACKOFF_LIMIT = 1
COMPARISON_ENV = ("HF_HOME", "POD_NAME", MODEL_TOKEN_ENV)


def comparison_gpus(job: FineTuneJob) -> int:
    """One GPU when the job trained on GPUs (vLLM serves both models from one), else none."""
    return 1 if job.spec.resources.gpus_per_node > 0 else 0


def compare_command(job: FineTuneJob, gpu_hour_price: float) -> list[str]:
    return ["python", "-m", "finetune_trainer", "compare", "--config", CONFIG_PATH,
            "--gpu-hour-price", repr(float(gpu_hour_price)), "--gpus", str(comparison_gpus(job))]


def build_comparison_job(job: FineTuneJob, image: str, gpu_hour_price: float) -> dict:
    """`image`: the operator's vLLM image; spec.deploy.vllm.image wins."""
    deploy = job.spec.deploy
    image = (deploy and deploy.vllm and deploy.vllm.image) or image
    template = build_pod_template(job, image)
    template["spec"].pop("subdomain", None)
    template["metadata"]["labels"] = labels_for(job.metadata.name, COMPONENT)
    container = template["spec"]["containers"][0]
    container.update({"name": CONTAINER, "image": image,
                      "command": compare_command(job, gpu_hour_price), "ports": []})
    del container["ports"]
    # vLLM's engine allocates a 160 MiB shared-memory ring buffer even on CPU: more than a
    # container's 64 MiB /dev/shm (the trainer's template has it only with GPUs).
    if not any(v["name"] == "dshm" for v in template["spec"]["volumes"]):
        template["spec"]["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
    for section in ("requests", "limits"):
        values = container["resources"].get(section)
        if values and GPU_RESOURCE in values:
            values[GPU_RESOURCE] = str(comparison_gpus(job))
    # Only what serving the base model needs: no push, tracker or other credentials.
    container["env"] = [e for e in container["env"] if e["name"] in COMPARISON_ENV] + [
        {"name": "FINETUNE_IMAGE", "value": image}]
    template["spec"]["terminationGracePeriodSeconds"] = 30
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": object_meta(job, names.comparison_job(job.metadata.name), COMPONENT),
            "spec": {"backoffLimit": BACKOFF_LIMIT, "podReplacementPolicy": "Failed",
                     "template": template}}
