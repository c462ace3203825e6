"""A checkpoint counts only with a COMPLETE marker whose manifest matches its files."""

from __future__ import annotations

from pathlib import Path

from finetune_trainer import checkpoints


def make_checkpoint(root: Path, step: int, *, complete: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (folder / "optimizer.pt").write_bytes(b"o" * 50)
    (folder / "trainer_state.json").write_text('{"global_step": %d}' % step)
    if complete:
        checkpoints.mark_complete(folder)
    return folder


def test_marked_checkpoint_verifies(tmp_path):
    folder = make_checkpoint(tmp_path, 5)
    assert checkpoints.verify(folder) is None


def test_resume_picks_newest_complete_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 3)
    assert checkpoints.find_resumable(tmp_path).step == 20


def test_checkpoint_without_marker_is_moved_aside(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, complete=False)

    latest = checkpoints.find_resumable(tmp_path)

    assert latest.step == 10
    assert not (tmp_path / "checkpoint-20").exists()
    assert [p.name.startswith("incomplete-checkpoint-20-") for p in tmp_path.iterdir()].count(True) == 1
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [10]


def test_truncated_file_makes_checkpoint_incomplete(tmp_path):
    make_checkpoint(tmp_path, 10)
    newest = make_checkpoint(tmp_path, 20)
    (newest / "optimizer.pt").write_bytes(b"o" * 7)

    assert "optimizer.pt is 7 bytes" in checkpoints.verify(newest)
    assert checkpoints.find_resumable(tmp_path).step == 10


def test_non_main_rank_skips_without_moving(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20, complete=False)

    assert checkpoints.find_resumable(tmp_path, quarantine_bad=False).step == 10
    assert (tmp_path / "checkpoint-20").exists()


def test_no_checkpoints_means_fresh_start(tmp_path):
    assert checkpoints.find_resumable(tmp_path / "missing") is None
    make_checkpoint(tmp_path, 4, complete=False)
    assert checkpoints.find_resumable(tmp_path) is None


def test_rotation_keeps_last_k_and_the_best(tmp_path):
    for step in (2, 4, 6, 8, 10):
        make_checkpoint(tmp_path, step)

    checkpoints.rotate(tmp_path, keep_last=2, best=str(tmp_path / "checkpoint-4"))

    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [4, 8, 10]


def test_rotation_leaves_a_checkpoint_being_written(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 6, complete=False)

    checkpoints.rotate(tmp_path, keep_last=1, best=None)

    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [4, 6]


def test_kept_summary_lists_complete_checkpoints_with_the_metrics_logged_before_each(tmp_path):
    import json

    history = [{"step": 2, "loss": 2.0, "mean_token_accuracy": 0.25}, {"step": 4, "loss": 1.5},
               {"step": 4, "eval_loss": 1.75, "eval_mean_token_accuracy": 0.5}, {"step": 6, "loss": 1.0}]
    for step in (4, 6, 8):
        folder = make_checkpoint(tmp_path, step, complete=False)
        (folder / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "log_history": [h for h in history if h["step"] <= step]}))
        if step != 8:
            checkpoints.mark_complete(folder)

    kept = checkpoints.kept_summary(tmp_path)

    assert [k["step"] for k in kept] == [4, 6], "an incomplete checkpoint is not listed"
    assert {k: v for k, v in kept[0].items() if k != "savedAt"} == {
        "step": 4, "trainLoss": 1.5, "evalLoss": 1.75, "meanTokenAccuracy": 0.25, "evalMeanTokenAccuracy": 0.5}
    assert kept[1]["trainLoss"] == 1.0 and kept[1]["savedAt"].endswith("Z")
