"""results.csv: the per-step training history in OpenAI's fine-tuning result-file columns,
drawn from the HF Trainer's log history.

One row per logged step (training and evaluation values logged at the same step share a row);
a value not logged at that step is an empty cell. Written on the job volume
(`reports/results.csv`) at each checkpoint and at the end, and to `output.resultsFile` when the
spec names one. Writing never fails a run.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# OpenAI's column <- the HF Trainer's logged key (TRL logs the token accuracies).
COLUMNS = (("train_loss", "loss"), ("train_accuracy", "mean_token_accuracy"),
           ("valid_loss", "eval_loss"), ("valid_mean_token_accuracy", "eval_mean_token_accuracy"))


def results_csv(log_history: list[dict[str, Any]]) -> str:
    rows: dict[int, dict[str, float]] = {}
    for entry in log_history:
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        values = {column: float(entry[key]) for column, key in COLUMNS
                  if isinstance(entry.get(key), (int, float)) and math.isfinite(entry[key])}
        if values:
            rows.setdefault(step, {}).update(values)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", *(column for column, _ in COLUMNS)])
    for step in sorted(rows):
        writer.writerow([step, *(_cell(rows[step].get(column)) for column, _ in COLUMNS)])
    return out.getvalue()


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def write_results(cfg, log_history: list[dict[str, Any]]) -> None:
    """Write results.csv on the job volume and to output.resultsFile (atomically: readers
    never see half a file)."""
    text = results_csv(log_history)
    paths = [cfg.paths.reports / "results.csv"]
    target = cfg.output.results_file
    if target and target.startswith("s3://"):
        _upload(target, text)
    elif target:
        paths.append(Path(target))
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write %s: %s", path, exc)


def _upload(location: str, text: str) -> None:
    """One PUT of results.csv to s3://bucket/key, with spec.objectStorage's credentials (the
    object is replaced whole: readers never see half a file)."""
    from finetune_api.sources import parse_source

    from .objectstore import ObjectStoreError, S3Client

    source = parse_source(location)
    try:
        S3Client.from_env().put_bytes(source.authority, source.path, text.encode())
    except ObjectStoreError as exc:  # the message names the location and the store's code only
        log.warning("could not upload results.csv: %s", exc)
