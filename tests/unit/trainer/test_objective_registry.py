"""Training objectives are plugins: one module each, found by name in a registry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune_trainer.config import DATASET_FORMATS, OBJECTIVES, ConfigError, TrainerConfig
from finetune_trainer.objectives import (MetricSpec, all_metric_specs, get_objective,
                                         objective_names, register)


def config(objective: str, fmt: str, **method) -> TrainerConfig:
    return TrainerConfig.from_dict({
        "model": {"source": "/models/tiny"},
        "method": {"type": "lora", "objective": objective, **method},
        "dataset": {"source": "/data/x.jsonl", "format": fmt},
    })


def test_every_objective_the_config_accepts_is_registered():
    assert objective_names() == sorted(OBJECTIVES)
    for name in objective_names():
        objective = get_objective(name)
        assert objective.name == name
        assert set(objective.formats) <= set(DATASET_FORMATS)


def test_sft_is_the_default_objective():
    cfg = TrainerConfig.from_dict({"model": {"source": "m"}, "dataset": {"source": "d.jsonl"}})
    assert cfg.method.objective == "sft" and cfg.method.dpo is None


def test_an_unknown_objective_names_the_field():
    with pytest.raises(ConfigError, match="method.objective: 'ppo' is not one of"):
        get_objective("ppo")
    with pytest.raises(ConfigError, match="method.objective: 'ppo' is not one of sft, dpo"):
        config("ppo", "instruction")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register(get_objective("sft"))


@pytest.mark.parametrize("objective, fmt, message", [
    ("sft", "preference", "dataset.format preference cannot be trained with method.objective sft"),
    ("dpo", "instruction", "dataset.format instruction cannot be trained with method.objective dpo; "
                           "it trains on preference"),
    ("dpo", "chat", "dataset.format chat cannot be trained with method.objective dpo"),
])
def test_each_objective_refuses_formats_it_cannot_train_on(objective, fmt, message):
    cfg = config(objective, fmt)
    with pytest.raises(ConfigError, match=message):
        get_objective(objective).check(cfg)


def test_dpo_section_defaults_and_bounds():
    cfg = config("dpo", "preference")
    assert (cfg.method.dpo.beta, cfg.method.dpo.loss_type) == (0.1, "sigmoid")
    get_objective("dpo").check(cfg)
    with pytest.raises(ConfigError, match="method.dpo.lossType: 'kto' is not one of"):
        config("dpo", "preference", dpo={"lossType": "kto"})
    with pytest.raises(ConfigError, match="method.dpo: only allowed when method.objective is dpo"):
        config("sft", "instruction", dpo={"beta": 0.2})
    with pytest.raises(ConfigError, match="method.dpo.beta: must be > 0"):
        get_objective("dpo").check(config("dpo", "preference", dpo={"beta": 0}))
    with pytest.raises(ConfigError, match="method.dpo.maxPromptLength: must be at least 1"):
        get_objective("dpo").check(config("dpo", "preference", dpo={"maxPromptLength": 0}))


def test_dpo_options_shape_the_prepared_data_and_its_cache_key(tmp_path):
    from finetune_trainer.prepared import dataset_digest

    base = {"model": {"source": "m"}, "dataset": {"source": str(tmp_path / "d.jsonl"), "format": "preference"},
            "paths": {"root": str(tmp_path)}}
    plain = TrainerConfig.from_dict({**base, "method": {"objective": "dpo"}})
    limited = TrainerConfig.from_dict({**base, "method": {"objective": "dpo", "dpo": {"maxPromptLength": 8}}})
    assert get_objective("dpo").data_options(limited) == {"max_prompt_length": 8,
                                                         "max_completion_length": None}
    assert dataset_digest(plain) != dataset_digest(limited)


def test_sft_cache_key_has_no_objective_part(tmp_path):
    """SFT's data options are empty, so caches prepared before objectives existed stay valid."""
    cfg = config("sft", "instruction")
    assert get_objective("sft").data_options(cfg) == {}


def test_metric_specs_are_unique():
    specs = all_metric_specs()
    assert all(isinstance(s, MetricSpec) for s in specs)
    assert len({s.status_key for s in specs}) == len(specs)
    assert len({s.gauge for s in specs}) == len(specs)
    assert {s.status_key for s in get_objective("dpo").metrics} == {
        "rewardsChosen", "rewardsRejected", "rewardsAccuracy", "rewardsMargin"}


def _imports(path, package: str) -> set[str]:
    """finetune_trainer modules a source file imports, at module level or inside functions."""
    import ast

    tree = ast.parse(path.read_text())
    here = package.split(".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if not module.startswith("finetune_trainer"):
                continue
            names = [f"{module}.{a.name}" for a in node.names]
            out.update(n for n in names if n.count(".") <= 2) if not node.module else out.add(module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("finetune_trainer"))
    return out


def test_trainer_modules_import_without_cycles():
    """No import cycle among the trainer's modules, lazy imports included (train and evaluate
    used to import each other's private names); the registry loads no ML library."""
    from pathlib import Path

    import finetune_trainer

    root = Path(finetune_trainer.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        graph[name] = _imports(path, name if is_package else ".".join(parts[:-1]))
    graph = {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}

    # Packages import their own submodules to register them (objectives -> objectives.sft);
    # only cycles between modules count, so edges into a module's own package are left out.
    def edges(module):
        return {d for d in graph[module] if not module.startswith(d + ".")}

    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for dep in edges(module):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert "finetune_trainer.train" not in graph["finetune_trainer.evaluate"]

    code = ("import sys, finetune_trainer.objectives\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)
