"""The torchrun command line the launcher builds (pure; the real runs are in
test_multinode_launch.py and test_trainer_run.py)."""

from __future__ import annotations

from finetune_trainer.launch import LaunchPlan, torchrun_command


def flags(command: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(command, command[1:]) if a.startswith("--")}


def test_several_nodes_join_an_elastic_c10d_rendezvous_hosted_by_the_launcher():
    plan = LaunchPlan(config="/etc/finetune/config.json", nproc_per_node=8, nnodes=2, node_rank=1,
                      rdzv_endpoint="big-trainer-0.big-trainer:29500", rdzv_id="uid-1", max_restarts=3,
                      grace_seconds=110, local_addr="big-trainer-1.big-trainer")
    command = torchrun_command(plan)
    f = flags(command)
    assert f["--rdzv-backend"] == "c10d" and f["--rdzv-endpoint"] == "big-trainer-0.big-trainer:29500"
    assert f["--rdzv-id"] == "uid-1" and f["--max-restarts"] == "3" and f["--nnodes"] == "2:2"
    assert "is_host=false" in f["--rdzv-conf"], "the agents join the store node 0's launcher hosts"
    assert f["--shutdown-timeout"] == "110", "workers get the pod's grace period, not torchrun's 30 s"
    assert f["--local-addr"] == "big-trainer-1.big-trainer"
    assert command[-5:] == ["-m", "finetune_trainer", "train", "--config", "/etc/finetune/config.json"]
    assert not plan.hosts_store and LaunchPlan(config="c", nnodes=2, rdzv_endpoint="h:1").hosts_store


def test_one_node_runs_standalone_without_restarts():
    command = torchrun_command(LaunchPlan(config="c.json", nproc_per_node=4))
    assert "--standalone" in command and "--rdzv-endpoint" not in command and "--max-restarts" not in command
    assert flags(command)["--nproc-per-node"] == "4"
