"""Two "nodes" on this machine: two `finetune-trainer launch` processes (nnodes 2, one gloo
worker each) joined through the elastic c10d rendezvous, as two trainer pods of an Indexed
Job are. Real training of the tiny model on CPU; only the network between the nodes is
loopback.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_trainer import checkpoints
from tests.fixtures.ml import trainer_command, trainer_env

pytestmark = pytest.mark.slow

PERMANENT = 42


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(configs: list[Path], tmp_path: Path, *, max_restarts: int = 0, timeout: float = 240):
    """Start one launcher per node (node 0 hosts the rendezvous store); return (returncode,
    output, termination message) per node."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for rank, config in enumerate(configs):
        command = [sys.executable, "-m", "finetune_trainer", "launch", "--config", str(config),
                   "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                   "--rdzv-endpoint", endpoint, "--rdzv-id", "test-uid", "--max-restarts", str(max_restarts),
                   "--local-addr", "127.0.0.1", "--join-timeout", "60"]
        env = trainer_env(tmp_path, FINETUNE_TERMINATION_LOG=str(tmp_path / f"termination-node{rank}"),
                          FINETUNE_COLLECTIVE_TIMEOUT_SECONDS="60")
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    try:
        for rank, proc in enumerate(procs):
            output, _ = proc.communicate(timeout=timeout)
            term = tmp_path / f"termination-node{rank}"
            results.append((proc.returncode, output, json.loads(term.read_text()) if term.is_file() else None))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def node_view(config: Path, tmp_path: Path, name: str, **training) -> Path:
    """The same job seen from another node: its own checkpoints folder, the same prepared
    dataset (its data cache is the first view's)."""
    doc = json.loads(config.read_text())
    doc["paths"]["jobFolder"] = f"views/{name}"
    doc["training"].update(training)
    root = Path(doc["paths"]["root"])
    (root / "views" / name).mkdir(parents=True)
    (root / "views" / name / "data-cache").symlink_to(root / "data-cache")
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def test_two_nodes_resume_from_the_checkpoint_rank_0_chose(trainer_config, tmp_path):
    # Given a real checkpoint-2 (one process, two steps), and two nodes whose views of the
    # volume differ: node A sees checkpoint-2, node B also sees a newer checkpoint-3.
    first = trainer_config(training={"maxSteps": 2, "saveSteps": 2, "loggingSteps": 1, "perDeviceBatchSize": 2},
                           dataset={"evalFraction": 0})
    result = subprocess.run(trainer_command(first), env=trainer_env(tmp_path), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    root = Path(json.loads(first.read_text())["paths"]["root"])
    node_a = node_view(first, tmp_path, "a", maxSteps=4)
    node_b = node_view(first, tmp_path, "b", maxSteps=4)
    shutil.copytree(root / "checkpoints" / "checkpoint-2", root / "views/a/checkpoints/checkpoint-2")
    shutil.copytree(root / "checkpoints" / "checkpoint-2", root / "views/b/checkpoints/checkpoint-2")
    newer = root / "views/b/checkpoints/checkpoint-3"
    shutil.copytree(root / "checkpoints" / "checkpoint-2", newer)
    state = json.loads((newer / "trainer_state.json").read_text())
    (newer / "trainer_state.json").write_text(json.dumps(dict(state, global_step=3)))
    (newer / checkpoints.COMPLETE_MARKER).unlink()
    checkpoints.mark_complete(newer, step=3)

    # When both nodes train to step 4 through the launcher.
    results = launch_two_nodes([node_a, node_b], tmp_path)

    # Then both exit 0, and both ranks resumed from the one checkpoint rank 0 chose.
    for code, output, _ in results:
        assert code == 0, output[-4000:]
    output = "".join(out for _, out, _ in results)
    resumed = re.findall(r"\[rank (\d)\] .*resuming from (\S+) \(step (\d+)\), chosen by rank 0", output)
    assert sorted(r for r, _, _ in resumed) == ["0", "1"], output[-4000:]
    assert len({(path, step) for _, path, step in resumed}) == 1, resumed
    summaries = [json.loads(p.read_text()) for p in root.glob("views/*/reports/summary.json")]
    assert len(summaries) == 1 and summaries[0]["step"] == 4
    assert summaries[0]["trainLoss"] == summaries[0]["trainLoss"]  # finite, not NaN
    assert [term["reason"] for _, _, term in results] == ["Succeeded", "Succeeded"]


def test_a_permanent_failure_on_one_node_fails_both_nodes_with_42_and_no_retry(trainer_config, tmp_path):
    # Given a dataset rank 0 refuses (every record lacks its output), and restarts allowed.
    bad = [{"instruction": f"say {i}"} for i in range(16)]
    config = trainer_config(records=bad)

    # When two nodes launch it.
    results = launch_two_nodes([config, config], tmp_path, max_restarts=3)

    # Then both pods exit 42 with the failing worker's reason, and the data was judged once:
    # neither agent restarted the group into another attempt.
    output = "".join(out for _, out, _ in results)
    assert [code for code, _, _ in results] == [PERMANENT, PERMANENT], output[-4000:]
    assert [term["reason"] for _, _, term in results] == ["DataValidationFailed"] * 2
    assert len(re.findall(r"ERROR .*DataValidationFailed:", output)) == 1, output[-4000:]
