"""training.sharding as the real API server admits it: `auto` is the visible default, and
`fsdp` is refused, naming the field, where there is nothing to shard or it is not supported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]


def job(name: str, **spec) -> dict:
    base = {"model": {"source": "org/tiny-llama"}, "method": {"type": "full"},
            "dataset": {"source": "pvc://datasets/train.jsonl", "format": "text"},
            "resources": {"gpusPerNode": 8, "nodes": 2}}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {**base, **spec}}


@pytest.fixture(scope="module")
def crds(cluster):
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.wait_established("finetunejobs.finetune.dev")
    return cluster


def create(cluster, namespace: str, manifest: dict):
    return cluster.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False)


def test_sharding_defaults_to_auto_and_fsdp_over_several_processes_is_admitted(crds, namespace):
    assert create(crds, namespace, job("default")).returncode == 0
    assert create(crds, namespace, job("sharded", training={"sharding": "fsdp"})).returncode == 0
    got = json.loads(crds.kubectl("get", "-n", namespace, "ftj", "default", "-o", "json").stdout)
    assert got["spec"]["training"]["sharding"] == "auto"


REFUSED = [
    ("one-process", {"training": {"sharding": "fsdp"}, "resources": {"gpusPerNode": 1}},
     "spec.training.sharding fsdp needs at least 2 training processes"),
    ("lora", {"training": {"sharding": "fsdp"}, "method": {"type": "lora"}},
     "spec.training.sharding fsdp is for sft with method.type full"),
    ("qlora", {"training": {"sharding": "fsdp"}, "method": {"type": "qlora"}},
     "spec.training.sharding fsdp is for sft with method.type full"),
    ("dpo", {"training": {"sharding": "fsdp"}, "method": {"type": "full", "objective": "dpo"},
             "dataset": {"source": "pvc://datasets/pairs.jsonl", "format": "preference"}},
     "spec.training.sharding fsdp is for sft with method.type full"),
    ("unknown", {"training": {"sharding": "deepspeed"}}, 'spec.training.sharding: Unsupported value: "deepspeed"'),
]


@pytest.mark.parametrize("case, spec, message", REFUSED, ids=[c[0] for c in REFUSED])
def test_fsdp_where_it_cannot_shard_is_refused_naming_the_field(crds, namespace, case, spec, message):
    result = create(crds, namespace, job(f"refused-{case}", **spec))
    assert result.returncode != 0, f"{case} was accepted"
    assert message in result.stderr, result.stderr
