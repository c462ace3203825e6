"""`finetune-trainer validate-data`: check a dataset on a laptop before any GPU time."""

from __future__ import annotations

import argparse
import json
import sys

from finetune_api.models import ChatTemplate
from finetune_api.schema import CHAT_TEMPLATE_NAMES

from ..config import (DATASET_FORMATS, LENGTH_POLICIES, ConfigError, DatasetConfig, DedupConfig,
                      TrainingConfig)
from .prepare import inspect_dataset
from .report import render_table, write_report

EXIT_USABLE = 0
EXIT_UNUSABLE = 2


def _field_map(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst:
            raise argparse.ArgumentTypeError(f"--field-map {item!r}: expected src=dst")
        mapping[src] = dst
    return mapping


def _parser() -> argparse.ArgumentParser:
    defaults = DatasetConfig(source="")
    parser = argparse.ArgumentParser(
        prog="finetune-trainer validate-data",
        description="Validate and clean a dataset the way a FineTuneJob would; exit 0 when "
                    "it is usable, 2 when it is not.",
    )
    parser.add_argument("path", metavar="PATH", nargs="?",
                        help="a .jsonl/.json/.csv/.parquet file, or a hub id (hf://org/name)")
    parser.add_argument("--format", required=True, choices=DATASET_FORMATS)
    parser.add_argument("--field-map", nargs="+", action="extend", default=[], metavar="SRC=DST",
                        help="rename fields (and chat roles), e.g. conversations=messages "
                             "from=role value=content human=user gpt=assistant")
    parser.add_argument("--near-threshold", type=float, default=DedupConfig().near_threshold,
                        help="Jaccard similarity of near-duplicates; 0 disables")
    parser.add_argument("--no-exact-dedup", action="store_true")
    parser.add_argument("--min-examples", type=int, default=defaults.min_examples)
    parser.add_argument("--max-invalid-fraction", type=float, default=0.0,
                        help="share of invalid records tolerated (default 0: any invalid "
                             "record makes the file unusable; a FineTuneJob's "
                             f"dataset.maxInvalidFraction defaults to {defaults.max_invalid_fraction})")
    parser.add_argument("--split", help="split of a hub dataset (default train)")
    parser.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction)
    parser.add_argument("--eval-source")
    parser.add_argument("--length-policy", choices=LENGTH_POLICIES,
                        default=defaults.length_policy)
    parser.add_argument("--max-seq-length", type=int, default=TrainingConfig().max_seq_length)
    parser.add_argument("--category-field")
    parser.add_argument("--seed", type=int, default=TrainingConfig().seed)
    parser.add_argument("--max-prompt-length", type=int,
                        help="preference pairs: keep the last N tokens of each prompt (DPO)")
    parser.add_argument("--max-completion-length", type=int,
                        help="preference pairs: keep the first N tokens of each answer (DPO)")
    parser.add_argument("--tokenizer", help="a hub id or path to count real tokens with "
                                            "(default: a whitespace approximation)")
    parser.add_argument("--chat-template", metavar="NAME|FILE",
                        help="with --tokenizer: render chat records with this template (a name: "
                             "model (the tokenizer's own, the default), "
                             f"{', '.join(CHAT_TEMPLATE_NAMES[1:])}; or a .jinja file), as "
                             "dataset.chatTemplate does")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--report", metavar="FILE", help="also write the JSON report here")
    return parser


def _load_tokenizer(name: str | None, chat_template: ChatTemplate):
    if not name:
        return None
    from transformers import AutoTokenizer

    from ..chat_templates import select

    tokenizer = AutoTokenizer.from_pretrained(name)
    select(tokenizer, chat_template)
    return tokenizer


def _chat_template(value: str | None) -> ChatTemplate:
    if value is None or value in CHAT_TEMPLATE_NAMES:
        return ChatTemplate(name=value or "model")
    if value.endswith((".jinja", ".j2")):
        return ChatTemplate(file=value)
    raise argparse.ArgumentTypeError(f"--chat-template {value!r}: expected one of "
                                     f"{', '.join(CHAT_TEMPLATE_NAMES)} or a .jinja file")


def validate_cli(argv: list[str]) -> int:
    """Run validate-data with `argv` (with or without the leading "validate-data")."""
    if argv and argv[0] == "validate-data":
        argv = argv[1:]
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        # `--field-map a=b c=d PATH` hands PATH to --field-map: take it back.
        if args.path is None and args.field_map and "=" not in args.field_map[-1]:
            args.path = args.field_map.pop()
        if args.path is None:
            parser.error("the following arguments are required: PATH")
        field_map = _field_map(args.field_map)
        chat_template = _chat_template(args.chat_template)
        if args.chat_template and not args.tokenizer:
            raise argparse.ArgumentTypeError("--chat-template renders with a tokenizer: give --tokenizer too")
    except argparse.ArgumentTypeError as exc:
        parser.print_usage(sys.stderr)
        print(f"validate-data: error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return int(exc.code or 0)
    cfg = DatasetConfig(
        source=args.path,
        format=args.format,
        split=args.split,
        field_map=field_map,
        eval_fraction=args.eval_fraction,
        eval_source=args.eval_source,
        dedup=DedupConfig(exact=not args.no_exact_dedup, near_threshold=args.near_threshold),
        min_examples=args.min_examples,
        max_invalid_fraction=args.max_invalid_fraction,
        length_policy=args.length_policy,
        category_field=args.category_field,
        chat_template=chat_template,
    )
    try:
        tokenizer = _load_tokenizer(args.tokenizer, chat_template)
    except ConfigError as exc:
        print(f"validate-data: error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    prepared = inspect_dataset(cfg, seed=args.seed, max_seq_length=args.max_seq_length,
                               tokenizer=tokenizer,
                               max_prompt_length=args.max_prompt_length,
                               max_completion_length=args.max_completion_length,
                               keep_records=False)
    report = prepared.report
    if args.report:
        write_report(report, args.report)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(render_table(report, f"{args.path} (format: {args.format})"))
    return EXIT_USABLE if report.usable else EXIT_UNUSABLE
