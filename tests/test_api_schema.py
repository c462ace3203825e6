"""The schema is defined once: the generated files, the typed models and the examples agree with it."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from finetune_api import _runtime, generate, models, schema

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if not p.name.startswith("quickstart"))
MODEL_OF_KIND = {"FineTuneJob": models.FineTuneJob, "InferenceService": models.InferenceService}


def apply_defaults(node: dict, value):
    """Structural defaulting as the API server does it: nested defaults after the parent's."""
    if isinstance(value, dict) and "properties" in node:
        out = dict(value)
        for key, child in node["properties"].items():
            if key not in out and "default" in child:
                out[key] = copy.deepcopy(child["default"])
            if key in out:
                out[key] = apply_defaults(child, out[key])
        return out
    if isinstance(value, list) and node.get("type") == "array":
        return [apply_defaults(node["items"], item) for item in value]
    return value


def python_type(node: dict):
    if node.get("x-kubernetes-int-or-string"):
        return str
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return dict
    return {"string": str, "integer": int, "number": float, "boolean": bool,
            "array": list, "object": dict}[node["type"]]


def field_type(tp):
    return _runtime._unwrap_optional(tp)


def is_optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def absent_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def compare(node: dict, cls: type, path: str, problems: list[str]) -> None:
    """Walks an object schema and its dataclass together, collecting every disagreement."""
    fields = {models.camel(f.name): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    properties = node["properties"]
    for key in sorted(set(properties) ^ set(fields)):
        where = "schema" if key in properties else f"dataclass {cls.__name__}"
        problems.append(f"{path}.{key}: only in the {where}")
    required = set(node.get("required", []))
    for key in sorted(set(properties) & set(fields)):
        child, f, where = properties[key], fields[key], f"{path}.{key}"
        tp = field_type(hints[f.name])
        default = absent_default(f)
        kind = python_type(child)
        origin = typing.get_origin(tp) or tp
        if dataclasses.is_dataclass(tp):
            origin = dict
        if origin is not kind:
            problems.append(f"{where}: schema type {child.get('type')} but dataclass type {tp}")
            continue
        if key in required:
            if default is not dataclasses.MISSING:
                problems.append(f"{where}: required in the schema but has a default in {cls.__name__}")
        elif "default" in child:
            expected = child["default"]
            if dataclasses.is_dataclass(tp):
                expected = models.parse(tp, apply_defaults(child, copy.deepcopy(expected)))
            elif kind is float and isinstance(expected, int):
                expected = float(expected)  # JSON has one number type
            if default != expected or type(default) is not type(expected):
                problems.append(f"{where}: schema default {expected!r} but dataclass default {default!r}")
        elif not (default is None or (default in ([], {}) and kind in (list, dict))):
            problems.append(f"{where}: no schema default but dataclass default {default!r}")
        elif default is None and not is_optional(hints[f.name]):
            problems.append(f"{where}: may be absent but {cls.__name__}.{f.name} is not Optional")
        if dataclasses.is_dataclass(tp):
            compare(child, tp, where, problems)
        elif origin is list:
            (item,) = typing.get_args(tp)
            if dataclasses.is_dataclass(item):
                compare(child["items"], item, where + "[]", problems)
            elif python_type(child["items"]) is not item:
                problems.append(f"{where}[]: schema items {child['items'].get('type')} but dataclass {item}")


def test_generated_files_are_up_to_date():
    assert generate.main(["--check", "--root", str(REPO)]) == 0, (
        "run: python -m finetune_api.generate")


def test_check_fails_when_a_generated_file_differs(tmp_path, capsys):
    assert generate.main(["--root", str(tmp_path)]) == 0
    assert generate.main(["--check", "--root", str(tmp_path)]) == 0
    crd = tmp_path / "crds" / "finetune.dev_finetunejobs.yaml"
    crd.write_text(crd.read_text().replace("default: 16", "default: 8"))
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1
    assert "finetune.dev_finetunejobs.yaml" in capsys.readouterr().err


def test_chart_copy_is_written_when_the_chart_has_a_crds_folder(tmp_path):
    (tmp_path / generate.CHART_CRDS).mkdir(parents=True)
    generate.main(["--root", str(tmp_path)])
    for name in ("finetune.dev_finetunejobs.yaml", "finetune.dev_inferenceservices.yaml"):
        assert (tmp_path / generate.CHART_CRDS / name).read_text() == (tmp_path / "crds" / name).read_text()
    (tmp_path / generate.CHART_CRDS / "finetune.dev_inferenceservices.yaml").write_text("stale\n")
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1


@pytest.mark.parametrize("crd_file", ["finetune.dev_finetunejobs.yaml", "finetune.dev_inferenceservices.yaml"])
def test_crd_on_disk_is_the_schema(crd_file):
    on_disk = yaml.safe_load((REPO / "crds" / crd_file).read_text())
    assert on_disk in schema.all_crds()


@pytest.mark.parametrize("kind, cls", [("FineTuneJob", models.FineTuneJob),
                                       ("InferenceService", models.InferenceService)])
@pytest.mark.parametrize("section", ["spec", "status"])
def test_models_agree_with_schema_on_fields_types_and_defaults(kind, cls, section):
    root = {"FineTuneJob": schema.FINETUNEJOB_SCHEMA, "InferenceService": schema.INFERENCESERVICE_SCHEMA}[kind]
    section_cls = typing.get_type_hints(cls)[section]
    problems: list[str] = []
    compare(root["properties"][section], section_cls, section, problems)
    assert problems == []


def test_compare_reports_a_default_that_drifted():
    drifted = copy.deepcopy(schema.FINETUNEJOB_SCHEMA["properties"]["spec"])
    drifted["properties"]["training"]["properties"]["seed"]["default"] = 7
    problems: list[str] = []
    compare(drifted, models.FineTuneJobSpec, "spec", problems)
    assert "spec.training.seed: schema default 7 but dataclass default 42" in problems
    assert len(problems) == 2  # and spec.training's default object, which holds the seed


def test_every_kind_has_required_examples():
    names = {p.name for p in EXAMPLES}
    assert {"lora-instruction.yaml", "qlora-chat.yaml", "full-two-nodes.yaml",
            "lora-with-deploy.yaml", "inferenceservice.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_models_parse_examples_with_the_servers_defaults(path):
    for doc in yaml.safe_load_all(path.read_text()):
        cls = MODEL_OF_KIND[doc["kind"]]
        root = schema.FINETUNEJOB_SCHEMA if cls is models.FineTuneJob else schema.INFERENCESERVICE_SCHEMA
        parsed = cls.from_resource(doc)
        as_admitted = cls.from_resource(apply_defaults(root, copy.deepcopy(doc)))
        assert parsed == as_admitted
        assert re.fullmatch(schema.DNS1123_SUBDOMAIN, parsed.metadata.name)


def test_examples_match_the_schema_patterns_and_enums():
    """A cheap local check of patterns and enums (the API server checks everything else)."""
    def check(node, value, where):
        if "pattern" in node and isinstance(value, str):
            assert re.search(node["pattern"], value), f"{where}={value!r} does not match"
        if "enum" in node:
            assert value in node["enum"], f"{where}={value!r} not in {node['enum']}"
        if isinstance(value, dict) and "properties" in node:
            for key, item in value.items():
                assert key in node["properties"], f"{where}.{key} is not in the schema"
                check(node["properties"][key], item, f"{where}.{key}")
        if isinstance(value, list) and "items" in node:
            for i, item in enumerate(value):
                check(node["items"], item, f"{where}[{i}]")

    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            root = schema.FINETUNEJOB_SCHEMA if doc["kind"] == "FineTuneJob" else schema.INFERENCESERVICE_SCHEMA
            check(root["properties"]["spec"], doc["spec"], f"{path.name}: spec")


def test_minimal_job_gets_every_documented_default():
    job = models.FineTuneJob.from_resource({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"},
        "spec": {"model": {"source": "org/model"}, "dataset": {"source": "pvc://data/x.jsonl"}}})
    spec = job.spec
    assert (spec.method.type, spec.method.lora) == ("lora", models.LoRA(r=16, alpha=32, dropout=0.05,
                                                                       target_modules=["all-linear"]))
    assert (spec.training.epochs, spec.training.per_device_batch_size, spec.training.learning_rate,
            spec.training.max_seq_length, spec.training.packing, spec.training.precision,
            spec.training.save_steps, spec.training.save_total_limit, spec.training.seed,
            spec.training.max_grad_norm) == (1.0, 4, 2e-4, 1024, "auto", "bf16", 100, 3, 42, 1.0)
    assert (spec.dataset.format, spec.dataset.eval_fraction, spec.dataset.dedup,
            spec.dataset.min_examples, spec.dataset.length_policy) == (
        "instruction", 0.05, models.Dedup(exact=True, near_threshold=0.9), 10, "truncate")
    assert (spec.resources.gpus_per_node, spec.resources.nodes) == (1, 1)
    assert (spec.storage.size, spec.storage.reclaim_policy, spec.suspend) == ("20Gi", "Retain", False)
    assert not job.started


def test_qlora_without_blocks_gets_lora_and_quantization_defaults():
    method = models.parse(models.Method, {"type": "qlora"})
    assert method.lora == models.LoRA()
    assert method.quantization == models.Quantization(quant_type="nf4", double_quant=True)
    assert models.parse(models.Method, {"type": "full"}).lora is None


def test_missing_required_field_names_the_field():
    with pytest.raises(models.InvalidResource, match=r"spec\.dataset\.source is required"):
        models.FineTuneJob.from_resource({"kind": "FineTuneJob", "metadata": {"name": "x"},
                                          "spec": {"model": {"source": "m"}, "dataset": {}}})


def test_to_dict_round_trips_camel_case():
    spec = models.parse(models.Training, {"learningRate": 1e-4, "earlyStopping": {"patience": 2}})
    assert models.to_dict(spec)["learningRate"] == 1e-4
    assert models.to_dict(spec)["earlyStopping"] == {"patience": 2, "threshold": 0.0}
    assert models.parse(models.Training, models.to_dict(spec)) == spec
