"""output.push: publish the artifacts after a successful run.

`s3://<bucket>/<prefix>`: the model card (README.md), loss.png, and the adapter/ and merged/
folders under `<prefix>/`, each file with a sha256 checksum (multipart above 16 MiB),
credentials from spec.objectStorage's Secret (objectstore.S3Client). `hf://<org>/<repo>`: the
same files in one commit with huggingface_hub (repository private unless push.private is
false), the token from push.tokenSecretRef. A push that fails is
retried with exponential backoff; when every attempt failed the run still succeeded: the
error goes to status.artifacts.pushError and the operator's Pushed=False condition.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from finetune_api.sources import S3, parse_source

from .config import TrainerConfig
from .objectstore import S3Client

log = logging.getLogger(__name__)
ATTEMPTS = int(os.environ.get("FINETUNE_PUSH_ATTEMPTS", "4"))
BACKOFF_SECONDS = float(os.environ.get("FINETUNE_PUSH_BACKOFF", "5"))


class PushError(RuntimeError):
    pass


def files_to_push(cfg: TrainerConfig, artifact_paths: dict[str, Any]) -> list[tuple[Path, str]]:
    """(file, name under the destination) of what is published."""
    root = cfg.paths.artifacts
    out = [(root / name, name) for name in ("README.md", "loss.png") if (root / name).is_file()]
    for kind in ("adapter", "merged"):
        folder = artifact_paths.get(kind)
        if folder:
            folder = Path(folder)
            out += [(f, f"{kind}/{f.relative_to(folder).as_posix()}")
                    for f in sorted(folder.rglob("*")) if f.is_file()]
    return out


def push_s3(uri: str, files: list[tuple[Path, str]], client: S3Client) -> None:
    source = parse_source(uri)
    prefix = source.path.strip("/")
    for path, name in files:
        client.upload(source.authority, f"{prefix}/{name}" if prefix else name, path)


def push_hub(cfg: TrainerConfig, uri: str, files: list[tuple[Path, str]]) -> None:
    """One commit of every file to the Hub repository (created, private by default, when
    missing). HF_ENDPOINT points at another Hub (an enterprise one, or a test's stand-in)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    token = os.environ.get(cfg.output.push_token_env) if cfg.output.push_token_env else None
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    repo = parse_source(uri).path
    api.create_repo(repo, private=cfg.output.push_private, exist_ok=True, repo_type="model")
    api.create_commit(repo, repo_type="model",
                      operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                                  for path, name in files],
                      commit_message=f"{cfg.job.namespace}/{cfg.job.name}: fine-tuned {cfg.model.source}")


def push(cfg: TrainerConfig, artifact_paths: dict[str, Any], *,
         s3: Callable[[], S3Client] = S3Client.from_env,
         sleep: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """Publish to output.pushUri; returns the status.artifacts fields to set: `pushed` on
    success, `pushError` when every attempt failed."""
    uri = cfg.output.push_uri
    files = files_to_push(cfg, artifact_paths)
    error = ""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            if parse_source(uri).scheme == S3:
                push_s3(uri, files, s3())
            else:
                push_hub(cfg, uri, files)
            log.info("pushed %d files to %s", len(files), uri)
            return {"pushed": uri}
        except Exception as exc:  # noqa: BLE001 - a push never fails a finished run
            error = f"push to {uri} failed (attempt {attempt} of {ATTEMPTS}): {exc}"
            log.warning("%s", error)
            if attempt < ATTEMPTS:
                sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
    return {"pushError": error[:1024]}
