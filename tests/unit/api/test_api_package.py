"""The API package is described once and shared: the CRD, the operator's models and the trainer's
config agree field by field because they are generated from `finetune_api.schema`; the package
needs only the standard library; the operator never imports the trainer."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune_api import generate, models, schema, trainer_config
from finetune_api._runtime import InvalidResource, camel
from finetune_api.sources import parse_source

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("kopf", "kubernetes", "yaml", "prometheus_client", "torch", "transformers", "peft",
         "trl", "datasets", "finetune_operator", "finetune_trainer")


def _fields(cls: type) -> dict[str, object]:
    """camelCase name -> default (MISSING when required) of a generated dataclass."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[camel(f.name)] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[camel(f.name)] = models.to_dict(value) if dataclasses.is_dataclass(value) else value
        else:
            out[camel(f.name)] = dataclasses.MISSING
    return out


def _crd_section(section: str) -> dict:
    crd = yaml.safe_load((REPO / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"][section]


def _defaulted(node: dict, value: dict) -> dict:
    """An object default with its fields' defaults filled in, as the API server does."""
    out = dict(value)
    for key, child in node.get("properties", {}).items():
        if key not in out and "default" in child:
            out[key] = copy.deepcopy(child["default"])
        if isinstance(out.get(key), dict):
            out[key] = _defaulted(child, out[key])
    return out


# Trainer-only fields, and spec fields the trainer must not see (Secrets), per section.
TRAINER_ONLY = {"model": {"tokenEnv"}, "evaluation": {"promptsSource"}}
SPEC_ONLY = {"model": {"tokenSecretRef"}}


@pytest.mark.parametrize("section", ["model", "method", "dataset", "training", "evaluation"])
def test_crd_operator_models_and_trainer_config_agree_field_by_field(section):
    crd = _crd_section(section)
    spec_cls = {f.name: f.type for f in dataclasses.fields(models.FineTuneJobSpec)}[section]
    trainer_cls = {f.name: f.type for f in dataclasses.fields(trainer_config.TrainerConfig)}[section]
    operator_fields = _fields(getattr(models, spec_cls))
    trainer_fields = _fields(getattr(trainer_config, trainer_cls, None) or getattr(models, trainer_cls))

    assert set(crd["properties"]) == set(operator_fields)
    assert set(operator_fields) - SPEC_ONLY.get(section, set()) == \
        set(trainer_fields) - TRAINER_ONLY.get(section, set())
    for key, node in crd["properties"].items():
        if key in SPEC_ONLY.get(section, set()):
            continue
        expected = node.get("default", dataclasses.MISSING if key in crd.get("required", [])
                            else None)
        if isinstance(expected, dict):
            expected = _defaulted(node, expected)
        for name, fields in (("operator model", operator_fields), ("trainer config", trainer_fields)):
            got = fields[key]
            if expected is None and got in ([], {}):
                continue  # an absent list or map is an empty one
            assert got == expected, f"{section}.{key}: CRD default {expected!r}, {name} {got!r}"

def test_a_new_spec_field_reaches_crd_models_and_trainer_config_from_one_edit(monkeypatch):
    """Adding a field is one line in schema.py plus `make generate`."""
    training = copy.deepcopy(schema.TRAINING)
    training["properties"]["labelSmoothing"] = schema.number("Label smoothing factor.",
                                                             default=0.1, minimum=0, maximum=1)
    monkeypatch.setitem(schema.FINETUNEJOB_SPEC["properties"], "training", training)
    monkeypatch.setitem(schema.TRAINER_CONFIG["properties"], "training", training)

    modules = generate.python_modules()
    crd = schema.finetunejob_crd()

    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["training"]["properties"]["labelSmoothing"]["default"] == 0.1
    assert "    label_smoothing: float = 0.1\n" in modules["models.py"]
    assert "training: Training" in modules["trainer_config.py"]  # the same class, not a copy
    assert "label_smoothing" not in modules["trainer_config.py"]


def test_generated_python_is_up_to_date():
    for name, text in generate.python_modules().items():
        assert (REPO / "api" / "finetune_api" / name).read_text() == text, (
            f"api/finetune_api/{name} is stale: run make generate")


def test_importing_the_api_package_loads_only_the_standard_library():
    code = ("import sys, finetune_api, finetune_api.models, finetune_api.trainer_config, "
            "finetune_api.sources, finetune_api.layout, finetune_api.exitcodes, "
            "finetune_api.generate; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def _imported_modules(package: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


def test_the_operator_imports_nothing_from_the_trainer():
    offenders = {path: sorted(n for n in names if n.split(".")[0] == "finetune_trainer")
                 for path, names in _imported_modules(REPO / "operator" / "finetune_operator").items()}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_operator_image_ships_the_api_package_and_no_trainer_code():
    dockerfile = (REPO / "operator.Dockerfile").read_text()
    ignore = (REPO / "operator.Dockerfile.dockerignore").read_text()
    assert "COPY api/ api/" in dockerfile and "!api/" in ignore
    assert "trainer_image" not in dockerfile and "trainer_image" not in ignore
    trainer = (REPO / "trainer_image" / "Dockerfile").read_text()
    assert "COPY api/finetune_api /opt/finetune/finetune_api" in trainer


def test_trainer_config_names_the_field_it_refuses():
    base = {"model": {"source": "/models/x"}, "dataset": {"source": "/data/x.jsonl"}}
    cases = [
        ({"training": {"precision": "fp8"}}, "config.training.precision: 'fp8' is not one of"),
        ({"training": {"learningRat": 1}}, "config.training.learningRat: unknown field"),
        ({"dataset": {"format": "chat", "minExamples": "ten"}}, "config.dataset.minExamples: expected integer"),
        ({"method": {"type": "full", "lora": {}}}, "method.lora: only allowed when"),
        ({"dataset": {}}, "config.dataset.source is required"),
    ]
    for override, message in cases:
        data = json.loads(json.dumps(base))
        for key, value in override.items():
            data[key] = {**data.get(key, {}), **value} if key != "dataset" or value else value
        with pytest.raises(InvalidResource, match=message.replace("(", r"\(")):
            trainer_config.TrainerConfig.from_dict(data)


def test_trainer_config_round_trips_through_its_file_form():
    cfg = trainer_config.TrainerConfig.from_dict({
        "model": {"source": "/models/x", "tokenEnv": "HF_TOKEN"},
        "dataset": {"source": "volume://data/x.jsonl", "mix": {"source": "/g.jsonl", "ratio": 0.2}},
        "evaluation": {"prompts": [{"prompt": "hi", "reference": "ho"}]},
    })
    assert cfg.method.lora is not None and cfg.method.lora.r == 16
    assert cfg.paths.resolve(cfg.dataset.source) == "/workspace/data/x.jsonl"
    assert trainer_config.TrainerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("location, parts", [
    ("pvc://datasets/support.jsonl", ("pvc", "datasets", "support.jsonl")),
    ("pvc://claim", ("pvc", "claim", "")),
    ("pvc://claim/dir/sub/", ("pvc", "claim", "dir/sub")),
    ("hf://org/name", ("hf", "", "org/name")),
    ("org/name", ("hf", "", "org/name")),
    ("gpt2", ("hf", "", "gpt2")),
    ("s3://bucket/key/x.jsonl", ("s3", "bucket", "key/x.jsonl")),
    ("https://example.com/a/b.jsonl", ("https", "example.com", "a/b.jsonl")),
    ("volume://data/x.jsonl", ("volume", "", "data/x.jsonl")),
    ("/models/base", ("path", "", "/models/base")),
])
def test_one_parser_tells_source_forms_apart(location, parts):
    source = parse_source(location)
    assert (source.scheme, source.authority, source.path) == parts
    if not location.endswith("/") and location not in ("org/name", "gpt2"):
        assert str(source) == location
