"""What the trainer writes into a FineTuneJob's status matches the CRD's schema.

The API server rejects a whole status patch when one field has the wrong type, so a drift
between the trainer and the schema would silently hide all progress.
"""

from __future__ import annotations

import math

import pytest

from finetune_api.schema import all_crds
from finetune_trainer.data import DatasetReport
from finetune_trainer.reporting import Progress, dataset_status


def _status_schema() -> dict:
    crd = next(c for c in all_crds() if c["spec"]["names"]["kind"] == "FineTuneJob")
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def _check(value, schema: dict, path: str) -> list[str]:
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        errors = []
        for key, sub in value.items():
            if key not in schema.get("properties", {}):
                errors.append(f"{path}.{key}: not declared (the API server would drop it)")
            else:
                errors += _check(sub, schema["properties"][key], f"{path}.{key}")
        return errors
    if kind == "array":
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        errors = [f"{path}: {len(value)} items, at most {schema['maxItems']}"] \
            if len(value) > schema.get("maxItems", len(value)) else []
        for i, item in enumerate(value):
            errors += _check(item, schema["items"], f"{path}[{i}]")
        return errors
    ok = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool)}[kind](value)
    errors = [] if ok else [f"{path}: {value!r} is not of type {kind}"]
    if ok and "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {value} above {schema['maximum']}")
    if ok and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} below {schema['minimum']}")
    return errors


@pytest.mark.parametrize("step,total,loss", [(0, 0, None), (1, 3, 2.5), (2, 3, float("nan")),
                                             (68, 68, 4.38), (10, 7, float("inf"))])
def test_status_patch_fits_the_finetunejob_status_schema(step, total, loss):
    p = Progress(step=step, total_steps=total, epoch=step / 3, train_loss=loss, eval_loss=loss,
                 learning_rate=1e-4, tokens_per_second=123.4, latest_checkpoint="checkpoint-2",
                 checkpoint_count=1)
    report = DatasetReport(examples_read=100, rejected=2, train_examples=90, eval_examples=8,
                           content_hash="ab" * 32, first_errors=[f"line {i}: bad" for i in range(30)],
                           problems=["too few examples"])
    p.dataset = dataset_status(report.to_dict())
    body = p.status_patch()
    assert _check(body["status"], _status_schema(), "status") == []


def test_comparison_status_fits_the_finetunejob_status_schema():
    """What `finetune-trainer compare` patches (issue 22), from a table with every column."""
    from finetune_trainer.compare import Answer, Item, ModelRun, comparison_status, table_rows

    items = [Item("prompt", prompt="p", reference="yes"), Item("sample", prompt="q", reference="/n.?/")]
    runs = {m: ModelRun([Answer("yes", 0.2, 5), Answer("no", 0.3, 7)], [1.5]) for m in ("base", "fine-tuned")}
    rows = table_rows(items, runs, {"base": "base", "fine-tuned": "fine-tuned"},
                      metrics=["bleu", "rouge", "exactMatch"], gpu_hour_price=2.0, gpus=1)
    report = {"state": "Measured", "message": "m", "prompts": 1, "samples": 1, "rows": rows}
    status = comparison_status(report, "/workspace/artifacts/comparison.json")
    assert {"bleu", "rougeL", "exactMatch", "patternMatch", "evalLoss", "costPer1kOutputTokens"} <= set(rows[0])
    assert _check({"comparison": status}, _status_schema(), "status") == []
    unavailable = comparison_status({"state": "Unavailable", "message": "no vLLM"}, "x")
    assert _check({"comparison": unavailable}, _status_schema(), "status") == []
