"""Training objectives: one recipe family per module, found through a registry.

An objective is what the training loop optimises (`spec.method.objective`): `sft`
(supervised fine-tuning, `sft.py`) and `dpo` (direct preference optimisation, `dpo.py`).
Everything else (config, data cleaning, model loading, checkpoints, callbacks, reporting,
artifacts) is shared; an objective only says:

- which dataset formats it trains on (`formats`) and which options of its own it passes to
  data preparation (`data_options`: DPO's prompt/completion lengths);
- whether the config is usable for it (`check`: raises ConfigError naming the field);
- how to build its TRL config and trainer (`build_args`, `make_trainer`), given the loaded
  model and the prepared records;
- what it adds to the evaluation report (`evaluate`), and to `finetune-trainer evaluate`
  (`standalone_eval`);
- whether its loss is a language-model loss (`lm_loss`: perplexity is reported only then);
- which of its logged values are reported (`metrics`: MetricSpecs route a TRL log key into
  `status.metrics.<statusKey>` and the gauge `finetune_trainer_<gauge>`).

How to add one: docs/design.md, "Adding a training objective".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from ..config import ConfigError, TrainerConfig


@dataclass(frozen=True)
class MetricSpec:
    """One value an objective logs and reports."""

    log_key: str  # the key in the trainer's logs, e.g. "rewards/chosen"
    status_key: str  # the field under status.metrics, e.g. "rewardsChosen"
    gauge: str  # Prometheus gauge finetune_trainer_<gauge>
    help: str


class Objective(Protocol):
    name: str
    formats: tuple[str, ...]
    metrics: tuple[MetricSpec, ...]
    # Whether the eval loss is a language-model loss (so exp(loss) is a perplexity).
    lm_loss: bool

    def check(self, cfg: TrainerConfig) -> None: ...

    def data_options(self, cfg: TrainerConfig) -> dict[str, Any]: ...

    def probe_kind(self, cfg: TrainerConfig) -> str: ...

    def data_kind(self, records: list[dict]) -> str: ...

    def load_model(self, cfg: TrainerConfig, precision): ...

    def build_args(self, cfg: TrainerConfig, precision, *, has_eval: bool, kind: str, tokenizer,
                   packing: bool): ...

    def make_trainer(self, cfg: TrainerConfig, model, args, tokenizer, train: list[dict],
                     evals: list[dict], callbacks: Sequence = ()): ...

    def evaluate(self, cfg: TrainerConfig, model, tokenizer, eval_records: list[dict], *,
                 reference=None) -> dict[str, Any]: ...

    def standalone_eval(self, cfg: TrainerConfig, model, tokenizer,
                        eval_records: list[dict]) -> dict[str, float]: ...


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    if objective.name in _REGISTRY:
        raise ValueError(f"objective {objective.name!r} is registered twice")
    _REGISTRY[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"method.objective: {name!r} is not one of "
                          f"{', '.join(sorted(_REGISTRY))}") from None


def objective_names() -> list[str]:
    return sorted(_REGISTRY)


def all_metric_specs() -> list[MetricSpec]:
    """Every objective's reported metrics (the Prometheus gauges a trainer declares)."""
    return [spec for name in objective_names() for spec in _REGISTRY[name].metrics]


def check_format(objective: Objective, cfg: TrainerConfig) -> None:
    if cfg.dataset.format not in objective.formats:
        raise ConfigError(
            f"dataset.format {cfg.dataset.format} cannot be trained with method.objective "
            f"{objective.name}; it trains on {', '.join(objective.formats)}")


# Importing the modules registers them (light: heavy imports happen inside their methods).
from . import dpo, sft  # noqa: E402,F401
