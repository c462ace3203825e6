"""The trainer as the pod runs it: `python -m finetune_trainer train --config ...` in a subprocess.

Given a tiny Llama and a small learnable dataset, on CPU.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.ml import trainer_command, trainer_env

pytestmark = pytest.mark.slow

PERMANENT, RETRYABLE = 42, 43


def run_trainer(config: Path, tmp_path: Path, timeout: float = 240, **env: str):
    result = subprocess.run(trainer_command(config), env=trainer_env(tmp_path, **env),
                            capture_output=True, text=True, timeout=timeout)
    return result


def termination(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "termination-log").read_text())


def workspace(config: Path) -> Path:
    return Path(json.loads(config.read_text())["paths"]["root"])


def logged_losses(root: Path) -> list[float]:
    newest = max((root / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                 key=lambda p: int(p.parent.name.split("-")[1]))
    return [e["loss"] for e in json.loads(newest.read_text())["log_history"] if "loss" in e]


def wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}:\n{proc.stderr.read()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def summary(root: Path) -> dict:
    return json.loads((root / "reports" / "summary.json").read_text())


def test_lora_lowers_the_loss_and_writes_a_servable_adapter(trainer_config, tmp_path, fake_kube_api):
    """Real training; its status patches go to a recording stand-in for the API server
    (fake_kube_api), since this test runs without a cluster (test_operator_realrun uses the real one)."""
    kubeconfig, patches = fake_kube_api
    config = trainer_config(
        training={"maxSteps": 16, "learningRate": 5e-3},
        evaluation={"metrics": ["bleu", "rouge", "exactMatch"],
                    "prompts": [{"prompt": "Repeat the word red 2 times.", "reference": "red red"}],
                    "maxNewTokens": 4},
        job={"name": "tune", "namespace": "team-a"},
        reporting={"statusPatch": True, "statusInterval": 0, "metricsPort": None},
    )

    result = run_trainer(config, tmp_path, FINETUNE_KUBECONFIG=str(kubeconfig))

    assert result.returncode == 0, result.stderr[-3000:]
    root = workspace(config)
    losses = logged_losses(root)
    assert losses[-1] < losses[0] * 0.95, losses
    adapter = root / "artifacts" / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] is None
    assert sorted(adapter_config["target_modules"]) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (adapter / "tokenizer.json").is_file()
    assert not (root / "artifacts" / "merged").exists()
    card = (root / "artifacts" / "README.md").read_text()
    assert "Method: lora" in card and summary(root)["datasetHash"] in card
    report = json.loads((root / "reports" / "eval.json").read_text())
    assert set(report["scores"]) == {"base", "finetuned"}
    assert {"bleu", "rouge1", "rougeL", "exactMatch"} <= set(report["scores"]["finetuned"])
    assert report["perplexity"] > 1
    # Base vs fine-tuned on the same eval set: the adapter learned the data, the base did not.
    assert report["baseEvalLoss"] > report["evalLoss"]
    assert report["basePerplexity"] == pytest.approx(math.exp(report["baseEvalLoss"]))
    assert termination(tmp_path)["reason"] == "Succeeded"
    # The tiny model has a (ChatML) chat template: the instruction records were trained through
    # it, and the run says so where serving and evaluation look (issue 16 item 8).
    assert summary(root)["promptFormat"] == "chat-template"
    assert json.loads((root / "reports" / "dataset.json").read_text())["promptFormat"] == "chat-template"
    assert "Prompt format: chat-template: ask through /v1/chat/completions" in card
    assert report["generations"][0]["prompt"] == "Repeat the word red 2 times."
    assert report["promptFormat"] == "chat-template"  # the evaluation prompts were asked so
    assert {path for path, _, _ in patches} == {
        "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tune/status"}
    assert patches[0][1]["Authorization"] == "Bearer test-token"
    final = patches[-1][2]["status"]
    assert any(p[2]["status"].get("dataset", {}).get("promptFormat") == "chat-template" for p in patches)
    assert final["progress"]["step"] == final["progress"]["totalSteps"] == 16
    assert final["progress"]["percent"] == 100.0
    assert {"trainLoss", "evalLoss", "perplexity", "learningRate"} <= set(final["metrics"])
    assert {k: final["evaluation"][k] for k in ("evalLoss", "perplexity", "baseEvalLoss", "basePerplexity")} == \
        pytest.approx({k: report[k] for k in ("evalLoss", "perplexity", "baseEvalLoss", "basePerplexity")})
    assert final["checkpoints"]["latest"] == "checkpoint-16"
    assert final["progress"]["tokensSeen"] == summary(root)["tokensSeen"] > 0
    on_disk = sorted(int(p.parent.name.split("-")[1]) for p in (root / "checkpoints").glob("checkpoint-*/COMPLETE"))
    assert [c["step"] for c in final["checkpoints"]["kept"]] == on_disk
    assert all("trainLoss" in c for c in final["checkpoints"]["kept"])
    results = (root / "reports" / "results.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in results[1:]] == [1, *range(2, 17, 2)]  # logging_first_step

    evaluated = subprocess.run(trainer_command(config, "evaluate"), env=trainer_env(tmp_path),
                               capture_output=True, text=True, timeout=240)

    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((root / "reports" / "eval.json").read_text())
    assert again["evalLoss"] == pytest.approx(report["evalLoss"], rel=1e-3)
    assert again["baseEvalLoss"] == pytest.approx(report["baseEvalLoss"], rel=1e-3), \
        "the separate pass of `evaluate` measures the base as the training run's own evaluation did"
    assert again["generations"][0]["finetuned"] == report["generations"][0]["finetuned"]


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_chat_and_text_datasets_train(trainer_config, tmp_path, fmt):
    config = trainer_config(dataset={"format": fmt}, training={"maxSteps": 8, "learningRate": 5e-3})

    result = run_trainer(config, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    root = workspace(config)
    losses = logged_losses(root)
    assert losses[-1] < losses[0], losses
    assert (root / "artifacts" / "adapter" / "adapter_model.safetensors").is_file()
    # The template trained with is what serving renders with (dataset.chatTemplate, #16).
    template = (root / "artifacts" / "chat_template.jinja").read_text()
    assert template == (root / "artifacts" / "adapter" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template


def test_full_fine_tuning_lowers_the_loss_and_writes_a_merged_model(trainer_config, tmp_path):
    config = trainer_config(method={"type": "full", "lora": None},
                            training={"maxSteps": 12, "learningRate": 1e-3})

    result = run_trainer(config, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    root = workspace(config)
    losses = logged_losses(root)
    assert losses[-1] < losses[0] * 0.8, losses
    merged = root / "artifacts" / "merged"
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert not (root / "artifacts" / "adapter").exists()
    report = json.loads((root / "reports" / "eval.json").read_text())
    assert report["baseEvalLoss"] > report["evalLoss"], "the base model, loaded again, is measured too"


def test_killed_run_resumes_from_last_complete_checkpoint(trainer_config, tmp_path):
    config = trainer_config(training={"maxSteps": 12, "saveSteps": 4})
    root = workspace(config)
    first = subprocess.Popen(trainer_command(config), env=trainer_env(tmp_path, FINETUNE_TEST_STEP_DELAY="0.4"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (root / "checkpoints" / "checkpoint-4" / "COMPLETE").is_file(), 180,
                 "the first checkpoint", first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    result = run_trainer(config, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    done = summary(root)
    assert done["resumedFrom"] in ("checkpoint-4", "checkpoint-8")
    assert done["step"] == 12
    state = json.loads((root / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12


def test_corrupted_newest_checkpoint_is_skipped(trainer_config, tmp_path):
    config = trainer_config(training={"maxSteps": 8, "saveSteps": 4, "gradientCheckpointing": True})
    root = workspace(config)
    assert run_trainer(config, tmp_path).returncode == 0
    newest = root / "checkpoints" / "checkpoint-8"
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    (root / "reports" / "summary.json").unlink()

    result = run_trainer(config, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(root)["resumedFrom"] == "checkpoint-4"
    assert "optimizer.pt is 100 bytes" in result.stderr
    assert any(p.name.startswith("incomplete-checkpoint-8-") for p in (root / "checkpoints").iterdir())


def test_sigterm_saves_a_checkpoint_and_exits_retryable(trainer_config, tmp_path):
    config = trainer_config(training={"maxSteps": 200, "saveSteps": 1000, "loggingSteps": 1})
    root = workspace(config)
    proc = subprocess.Popen(trainer_command(config), env=trainer_env(tmp_path, FINETUNE_TEST_STEP_DELAY="0.2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "'loss'" in line:
                break
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert proc.returncode == RETRYABLE
    saved = list((root / "checkpoints").glob("checkpoint-*/COMPLETE"))
    assert len(saved) == 1
    step = int(saved[0].parent.name.split("-")[1])
    assert 0 < step < 200
    assert termination(tmp_path)["reason"] == "Terminated"
    assert not (root / "artifacts").exists()


def test_nan_loss_stops_with_permanent_exit(trainer_config, tmp_path):
    config = trainer_config(training={"maxSteps": 12, "loggingSteps": 1})

    result = run_trainer(config, tmp_path, FINETUNE_TEST_NAN_AT_STEP="3")

    assert result.returncode == PERMANENT, result.stderr[-3000:]
    end = termination(tmp_path)
    assert end["reason"] == "TrainingDiverged"
    assert "loss became nan" in end["message"]
    assert not (workspace(config) / "artifacts").exists()


def test_absurd_learning_rate_diverges_with_permanent_exit(trainer_config, tmp_path):
    config = trainer_config(method={"type": "full", "lora": None},
                            training={"maxSteps": 12, "loggingSteps": 1, "learningRate": 1e30,
                                      "optimizer": "sgd", "maxGradNorm": 0})

    result = run_trainer(config, tmp_path)

    assert result.returncode == PERMANENT, result.stderr[-3000:]
    assert termination(tmp_path)["reason"] == "TrainingDiverged"


def test_qlora_without_cuda_fails_at_once_with_permanent_exit(trainer_config, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = trainer_config(method={"type": "qlora"})

    result = run_trainer(config, tmp_path, timeout=120)

    assert result.returncode == PERMANENT
    end = termination(tmp_path)
    assert end["reason"] == "InvalidConfig"
    assert "qlora needs a CUDA GPU" in end["message"]
    assert not (workspace(config) / "data-cache").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="QLoRA needs a CUDA device")
@pytest.mark.gpu
def test_qlora_trains_on_cuda(trainer_config, tmp_path):
    config = trainer_config(method={"type": "qlora", "quantization": {"quantType": "nf4"}},
                            training={"maxSteps": 12, "precision": "bf16", "learningRate": 5e-3})

    result = run_trainer(config, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    root = workspace(config)
    losses = logged_losses(root)
    assert losses[-1] < losses[0], losses
    assert (root / "artifacts" / "adapter" / "adapter_model.safetensors").is_file()


def test_two_process_torchrun_trains_once_and_writes_one_set_of_artifacts(trainer_config, tmp_path):
    config = trainer_config(training={"maxSteps": 8, "saveSteps": 4, "perDeviceBatchSize": 2},
                            output={"merge": True})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "finetune_trainer", "train", "--config", str(config)]

    result = subprocess.run(command, env=trainer_env(tmp_path), capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-4000:]
    root = workspace(config)
    assert summary(root)["step"] == 8
    assert sorted(p.name for p in (root / "artifacts").iterdir()) == ["README.md", "adapter", "chat_template.jinja",
                                                                      "loss.png", "merged",
                                                                      "prompt_renderings.json"]
    assert (root / "artifacts" / "merged" / "model.safetensors").is_file()
    assert len(list((root / "data-cache").iterdir())) == 1
    assert len(re.findall(r"prepared dataset \w+: \d+ train", result.stderr)) == 1
    assert "using the prepared dataset cache" in result.stderr
    complete = sorted(p.parent.name for p in (root / "checkpoints").glob("checkpoint-*/COMPLETE"))
    assert complete == ["checkpoint-4", "checkpoint-8"]
    assert (root / "checkpoints" / "checkpoint-8" / "rng_state_1.pth").is_file()


def test_multi_process_sigterm_checkpoints_and_exits_retryable(trainer_config, tmp_path):
    config = trainer_config(training={"maxSteps": 200, "saveSteps": 1000, "loggingSteps": 1,
                                      "perDeviceBatchSize": 2})
    root = workspace(config)
    proc = subprocess.Popen([*trainer_command(config), "--nproc-per-node", "2"],
                            env=trainer_env(tmp_path, FINETUNE_TEST_STEP_DELAY="0.2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "'loss'" in line:
                break
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert proc.returncode == RETRYABLE
    saved = list((root / "checkpoints").glob("checkpoint-*/COMPLETE"))
    assert len(saved) == 1
    assert (saved[0].parent / "rng_state_1.pth").is_file()
    assert termination(tmp_path)["reason"] == "Terminated"


def test_multi_process_permanent_failure_keeps_its_exit_code(trainer_config, tmp_path):
    config = trainer_config(training={"maxSteps": 12, "loggingSteps": 1, "perDeviceBatchSize": 2})

    result = subprocess.run([*trainer_command(config), "--nproc-per-node", "2"],
                            env=trainer_env(tmp_path, FINETUNE_TEST_NAN_AT_STEP="2"),
                            capture_output=True, text=True, timeout=240)

    assert result.returncode == PERMANENT, result.stderr[-3000:]
    assert termination(tmp_path)["reason"] == "TrainingDiverged"
