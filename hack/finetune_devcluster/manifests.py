"""Objects the local cluster starts with: kwok-managed GPU/CPU nodes and storage."""

from __future__ import annotations

GPU_LABEL = "nvidia.com/gpu.present"
POOL_LABEL = "finetune.dev/pool"
GPUS_PER_NODE = 8


def nodes(gpu_nodes: tuple[str, ...], cpu_nodes: tuple[str, ...]) -> list[dict]:
    """Fake nodes managed by kwok; GPU nodes carry a label and a taint like real GPU pools."""
    from .cluster import GPU_TAINT_KEY, KWOK_NODE_ANNOTATION

    out = []
    for name in gpu_nodes + cpu_nodes:
        gpu = name in gpu_nodes
        out.append({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                "labels": {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64", "type": "kwok",
                    POOL_LABEL: "gpu" if gpu else "cpu",
                    **({GPU_LABEL: "true", "nvidia.com/gpu.product": "NVIDIA-H200"} if gpu else {}),
                },
            },
            "spec": {"taints": [{"key": GPU_TAINT_KEY, "value": "present", "effect": "NoSchedule"}]
                     if gpu else []},
        })
    return out


def node_status(name: str, gpu: bool, gpus: int = GPUS_PER_NODE) -> dict:
    resources = {"cpu": "64" if gpu else "16", "memory": "512Gi" if gpu else "64Gi",
                 "pods": "110", "ephemeral-storage": "1Ti"}
    if gpu:
        resources["nvidia.com/gpu"] = str(gpus)
    return {"status": {"capacity": resources, "allocatable": resources}}


def storage() -> list[dict]:
    """The default StorageClass, served by the local node agent's hostPath provisioner."""
    from .cluster import STORAGE_CLASS, STORAGE_PROVISIONER

    return [{
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS,
                     "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": STORAGE_PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }]
