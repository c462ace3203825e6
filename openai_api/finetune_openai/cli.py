"""`finetune-operator api`: serve OpenAI's fine-tuning API; `finetune-operator api create-key`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml


def _model(item: str) -> tuple[str, str]:
    name, sep, source = item.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"--model {item!r}: expected NAME=SOURCE (e.g. "
                                         "llama-3.1-8b=meta-llama/Llama-3.1-8B-Instruct)")
    return name, source


def _parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="finetune-operator api", description=__doc__)
    p.add_argument("--host", default=env("FINETUNE_API_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(env("FINETUNE_API_PORT", "8090")))
    p.add_argument("--files-dir", type=Path, default=env("FINETUNE_API_FILES_DIR"),
                   help="folder holding one folder per namespace: the root of --files-claim there")
    p.add_argument("--files-claim", default=env("FINETUNE_API_FILES_CLAIM", "openai-files"),
                   help="the claim, in each namespace, on which FineTuneJobs read the uploads "
                        "(default %(default)s)")
    p.add_argument("--files-store", default=env("FINETUNE_API_FILES_STORE"),
                   help="store uploads in object storage instead: s3://bucket[/prefix], one folder per namespace")
    p.add_argument("--files-store-secret", default=env("FINETUNE_API_FILES_STORE_SECRET", "finetune-object-storage"),
                   help="with --files-store: the Secret, in each namespace, with that namespace's S3 credentials "
                        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional AWS_SESSION_TOKEN, AWS_REGION, "
                        "AWS_ENDPOINT_URL); its jobs read their files with it (default %(default)s)")
    p.add_argument("--files-store-endpoint", default=env("FINETUNE_API_FILES_STORE_ENDPOINT"),
                   help="with --files-store: the endpoint the API uses, when it differs from the Secret's "
                        "AWS_ENDPOINT_URL (which the trainer pods use)")
    p.add_argument("--keys-namespace", default=env("FINETUNE_API_KEYS_NAMESPACE", "finetune-system"),
                   help="namespace of the Secrets holding API key hashes (default %(default)s)")
    p.add_argument("--model", type=_model, action="append", default=[], dest="models", metavar="NAME=SOURCE",
                   help="a base model a job may name, and its spec.model.source (repeatable)")
    p.add_argument("--models-file", type=Path, default=env("FINETUNE_API_MODELS_FILE"),
                   help="YAML mapping of model names to sources (as --model)")
    p.add_argument("--job-template", type=Path, default=env("FINETUNE_API_JOB_TEMPLATE"),
                   help="YAML: a partial FineTuneJob spec (method, placement, deploy) the API's jobs start from")
    p.add_argument("--max-stored-bytes", type=int, default=10 << 30, help="per namespace (default 10 GiB)")
    p.add_argument("--max-file-bytes", type=int, default=512 << 20, help="per upload (default 512 MiB)")
    p.add_argument("--max-running-jobs", type=int, default=4, help="queued or running jobs per namespace")
    p.add_argument("--inference-host", help="reach InferenceServices at this host instead of their Service "
                                            "name (local runs without cluster DNS)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    return p


def _create_key(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="finetune-operator api create-key",
                                description="Issue an API key bound to one namespace; prints the key once "
                                            "(only its sha256 is stored, in a Secret).")
    p.add_argument("--namespace", required=True, help="the namespace the key acts in")
    p.add_argument("--keys-namespace", default=os.environ.get("FINETUNE_API_KEYS_NAMESPACE", "finetune-system"))
    p.add_argument("--description", default="")
    args = p.parse_args(argv)
    from .auth import api_key_secret, new_api_key
    from .kube import Kube

    key = new_api_key()
    Kube().create_secret(args.keys_namespace, api_key_secret(key, args.namespace, description=args.description))
    print(key)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["create-key"]:
        return _create_key(argv[1:])
    args = _parser().parse_args(argv)
    if args.files_dir is None and not args.files_store:
        _parser().error("--files-dir or --files-store is required")
    if args.files_store and not args.files_store.startswith("s3://"):
        _parser().error(f"--files-store {args.files_store!r}: expected s3://bucket[/prefix]")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = dict(args.models)
    if args.models_file:
        models = {**(yaml.safe_load(args.models_file.read_text()) or {}), **models}
    template = yaml.safe_load(args.job_template.read_text()) if args.job_template else {}
    from aiohttp import web

    from .kube import Kube
    from .server import Api, ApiConfig

    cfg = ApiConfig(files_dir=args.files_dir, files_claim=args.files_claim, keys_namespace=args.keys_namespace,
                    models=models, job_template=template or {}, max_stored_bytes=args.max_stored_bytes,
                    max_file_bytes=args.max_file_bytes, max_running_jobs=args.max_running_jobs,
                    inference_host=args.inference_host, files_store=args.files_store,
                    files_store_secret=args.files_store_secret, files_store_endpoint=args.files_store_endpoint)
    if args.files_dir is not None:
        args.files_dir.mkdir(parents=True, exist_ok=True)
    web.run_app(Api(cfg, Kube()).app(), host=args.host, port=args.port, print=None,
                access_log_format='%a "%r" %s %b %Tfs')
    return 0
