"""The prepared dataset on the job volume: prepared once, cached by content hash.

Rank 0 (under `main_process_first`) validates and cleans the dataset and writes
`data-cache/<digest>/{train,eval}.jsonl` and `report.json`, then a READY marker; other ranks,
later attempts and `finetune-trainer evaluate` read the cache. The digest covers everything
that shapes the prepared records, including an objective's own data options (DPO's prompt
and completion lengths).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from finetune_api.models import to_dict

from .config import TrainerConfig

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    report: Any
    digest: str


def _hash_source(digest: "hashlib._Hash", source: str | None) -> None:
    if not source:
        return
    digest.update(source.encode())
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if not file.is_file():
            continue  # a hub dataset: the config (name, split) is the key
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)


def data_options(cfg: TrainerConfig) -> dict[str, Any]:
    """The objective's own options for data preparation (empty for SFT)."""
    from .objectives import get_objective

    return get_objective(cfg.method.objective).data_options(cfg)


def dataset_digest(cfg: TrainerConfig) -> str:
    """Content hash of everything that shapes the prepared dataset."""
    digest = hashlib.sha256()
    key: dict[str, Any] = {
        "dataset": to_dict(cfg.dataset),
        "seed": cfg.training.seed,
        "maxSeqLength": cfg.training.max_seq_length,
        "model": cfg.model.source,
        "revision": cfg.model.revision,
    }
    options = data_options(cfg)
    if options:  # only then: SFT digests stay what they were
        key["objective"] = {"name": cfg.method.objective, **options}
    formats = {cfg.dataset.format, cfg.dataset.mix.format if cfg.dataset.mix else None}
    if formats & {"instruction", "completion"}:
        # Instruction and completion records go through the model's chat template now, not
        # the Alpaca prompt: a cache prepared before that is not reused.
        key["promptFormats"] = "chat-template-when-the-model-has-one"
    digest.update(json.dumps(key, sort_keys=True).encode())
    resolve = cfg.paths.resolve
    _hash_source(digest, resolve(cfg.dataset.source))
    _hash_source(digest, resolve(cfg.dataset.eval_source) if cfg.dataset.eval_source else None)
    _hash_source(digest, resolve(cfg.dataset.mix.source) if cfg.dataset.mix else None)
    template = cfg.dataset.chat_template.file
    _hash_source(digest, resolve(template) if template else None)  # it shapes lengths and errors
    return digest.hexdigest()[:20]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value):
        return asdict(value)
    return value


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def cached_eval_records(cfg: TrainerConfig) -> list[dict] | None:
    """The prepared eval split a run left in the data cache, or None."""
    eval_file = cfg.paths.data_cache / dataset_digest(cfg) / "eval.jsonl"
    if not eval_file.is_file():
        log.info("no prepared eval split at %s", eval_file)
        return None
    return read_jsonl(eval_file)


def recorded_prompt_format(cfg: TrainerConfig) -> str | None:
    """The prompt format training recorded (finetune_api.prompts: chat-template, alpaca, raw)
    in its dataset report, for the evaluation and the comparison; None when no run left one."""
    for where in (lambda: cfg.paths.reports / "dataset.json",
                  lambda: cfg.paths.data_cache / dataset_digest(cfg) / "report.json"):
        try:
            path = where()
            value = json.loads(path.read_text()).get("promptFormat")
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return str(value)
    return None


def prepare_data(cfg: TrainerConfig, tokenizer, *, is_main: bool) -> PreparedData:
    """Prepare the dataset, or read the cache another rank (or an earlier attempt) wrote.

    Callers run this under `main_process_first`: the main process builds the cache, the
    others find it ready.
    """
    digest = dataset_digest(cfg)
    cache = cfg.paths.data_cache / digest
    ready = cache / "READY"
    if not ready.is_file():
        if not is_main:
            raise RuntimeError(f"the prepared dataset {cache} is missing after the main process ran")
        from .data import DataValidationError, prepare_dataset

        cache.parent.mkdir(parents=True, exist_ok=True)
        # A pod killed while preparing leaves its spill files behind; only one prepares at once.
        for stale in cache.parent.glob(".prepare-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            # Records being cleaned spill to the claim, not to the pod's memory or /tmp.
            prepared = prepare_dataset(cfg.dataset, seed=cfg.training.seed,
                                       max_seq_length=cfg.training.max_seq_length,
                                       tokenizer=tokenizer, resolve=cfg.paths.resolve,
                                       work_dir=cache.parent, **data_options(cfg))
        except DataValidationError as exc:
            report_unusable_dataset(cfg, exc)
            raise
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=cache.parent))
        write_jsonl(staging / "train.jsonl", list(prepared.train))
        write_jsonl(staging / "eval.jsonl", list(prepared.eval))
        (staging / "report.json").write_text(json.dumps(_jsonable(prepared.report), indent=2, default=str))
        (staging / "READY").write_text(digest + "\n")
        if cache.exists():
            shutil.rmtree(cache)
        staging.rename(cache)
        cfg.paths.reports.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache / "report.json", cfg.paths.reports / "dataset.json")
        log.info("prepared dataset %s: %d train, %d eval records", digest,
                 len(prepared.train), len(prepared.eval))
    else:
        log.info("using the prepared dataset cache %s", cache)
    return PreparedData(
        train=read_jsonl(cache / "train.jsonl"),
        eval=read_jsonl(cache / "eval.jsonl"),
        report=json.loads((cache / "report.json").read_text()),
        digest=digest,
    )


def report_unusable_dataset(cfg: TrainerConfig, exc) -> None:
    """Put the line-numbered errors of an unusable dataset into the FineTuneJob's status."""
    from .reporting import StatusPatcher, dataset_status

    cfg.paths.reports.mkdir(parents=True, exist_ok=True)
    report = exc.report.to_dict()
    (cfg.paths.reports / "dataset.json").write_text(json.dumps(_jsonable(report), indent=2, default=str))
    if cfg.reporting.status_patch:
        StatusPatcher(cfg.job, 0).patch({"status": {"dataset": dataset_status(report)}})
