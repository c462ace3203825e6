"""loss.png: training and evaluation loss against step, with the learning rate, drawn from
the HF Trainer's log history. Written beside the model card, which embeds it.

Drawing never fails a run: a history with nothing to draw, or a plotting error, is logged
and the card goes without a plot.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def loss_series(log_history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of `loss`, `eval_loss` and `learning_rate` from the log history,
    finite values only, in step order."""
    series: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": [], "learning_rate": []}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, points in series.items():
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                points.append((int(step), float(value)))
    return {k: sorted(v) for k, v in series.items()}


def write_loss_plot(log_history: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Draw loss.png at `path`; returns it, or None when there was nothing to draw."""
    series = loss_series(log_history)
    if not series["loss"] and not series["eval_loss"]:
        log.info("no loss was logged: no loss plot")
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 1]})
        if series["loss"]:
            steps, values = zip(*series["loss"])
            ax_loss.plot(steps, values, marker="." if len(steps) < 50 else None, label="training loss")
        if series["eval_loss"]:
            steps, values = zip(*series["eval_loss"])
            ax_loss.plot(steps, values, marker="o", linestyle="--", label="evaluation loss")
        ax_loss.set_ylabel("loss")
        ax_loss.set_title(title)
        ax_loss.grid(True, alpha=0.3)
        ax_loss.legend()
        if series["learning_rate"]:
            steps, values = zip(*series["learning_rate"])
            ax_lr.plot(steps, values, color="tab:green")
            ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("optimizer step")
        ax_lr.grid(True, alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    except Exception as exc:  # noqa: BLE001 - a plot never fails the run
        log.warning("cannot draw the loss plot (the model card goes without it): %s", exc)
        return None
