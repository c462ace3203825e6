"""#16 item 7: the loss-spike guard compared against the running minimum, so a healthy
multi-epoch run (tiny loss late on, one harder batch many times it) was killed."""

from __future__ import annotations

import math

from finetune_trainer.callbacks import LossSpikeDetector


def healthy_three_epochs() -> list[float]:
    # Loss falls from 2.5 to about 0.02 over three epochs, with an epoch boundary bump and
    # batch-to-batch jitter of up to 15x the late median (a hard batch): never above the start.
    losses = [2.5 * math.exp(-k / 12) for k in range(60)]
    losses = [max(x, 0.02) for x in losses]
    for k in (30, 41, 55):
        losses[k] = 0.35
    return losses


def test_a_learning_multi_epoch_run_is_not_stopped():
    guard = LossSpikeDetector(factor=5.0)
    assert [guard.observe(x) for x in healthy_three_epochs()] == [None] * 60
    # The old rule (factor x the running minimum) would have stopped it.
    losses = healthy_three_epochs()
    assert losses[55] > 5.0 * min(losses[:55])


def test_a_diverging_run_is_stopped_once_it_climbs_past_its_start():
    guard = LossSpikeDetector(factor=5.0)
    for loss in (2.5, 2.0, 1.5, 1.2, 1.0):
        assert guard.observe(loss) is None
    assert guard.observe(4.0) is None  # not over 5 x the median 1.5
    reason = guard.observe(12.0)  # over 5 x the median 2.0, and above the start
    assert reason and "median" in reason and "first logged loss 2.5" in reason


def test_zero_disables_it():
    guard = LossSpikeDetector(factor=0.0)
    assert [guard.observe(x) for x in (1.0, 1.0, 1.0, 1000.0)] == [None] * 4
