"""s3:// and https:// sources onto the job volume, before anything reads them.

Each remote source of the config (model.source, dataset.source, dataset.evalSource,
dataset.mix.source) is downloaded to `layout.remote_source(location)` on the job volume:
a file, or a folder when an s3:// location names a prefix (`s3://bucket/models/tiny/`, or a
key with no object but objects under `key/`). A file is written as `<name>.part` and renamed
when complete, so a restarted pod resumes it with a ranged GET; `manifest.json` (sizes and
sha256 of every file) is written last, and a source whose manifest matches the files is
reused without a request. The digests go to status.sources and the model card.

https:// is verified against the trainer image's CA store; a private CA is trusted through
SSL_CERT_FILE (Python's and OpenSSL's standard variable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from finetune_api import layout
from finetune_api.sources import HTTPS, S3, parse_source

from .config import ConfigError, TrainerConfig
from .objectstore import CHUNK, TIMEOUT, ObjectStoreError, S3Client

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class SourceUnavailable(RuntimeError):
    """A remote source could not be downloaded (retryable: the store may come back)."""


def remote_locations(cfg: TrainerConfig) -> list[str]:
    d = cfg.dataset
    wanted = [cfg.model.source, d.source, d.eval_source, d.mix.source if d.mix else None]
    return [loc for loc in dict.fromkeys(w for w in wanted if w)
            if parse_source(loc).scheme in (S3, HTTPS)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reusable(folder: Path, location: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("location") != location:
        return None
    for rel, info in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return None
    return manifest


def _s3_objects(client: S3Client, location: str) -> list[tuple[str, str, int]]:
    """(key, path relative to the target, size) of what an s3:// location names."""
    src = parse_source(location)
    bucket, key = src.authority, src.path
    if key and not location.endswith("/"):
        info = client.head(bucket, key)
        if info is not None:
            return [(key, "", info.size)]
    prefix = f"{key}/" if key else ""
    objects = [(o.key, o.key[len(prefix):], o.size) for o in client.list(bucket, prefix)
               if not o.key.endswith("/")]
    if not objects:
        raise ConfigError(f"{location}: no object and no folder of objects at this location")
    return objects


def _https_download(url: str, dest: Path, context: ssl.SSLContext) -> None:
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(request, timeout=TIMEOUT, context=context)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the .part already holds everything
            part.replace(dest)
            return
        if exc.code in (401, 403, 404, 410):
            raise ConfigError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        raise SourceUnavailable(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SourceUnavailable(f"{url}: {getattr(exc, 'reason', exc)}") from None
    with resp, part.open("ab" if have and resp.status == 206 else "wb") as out:
        while chunk := resp.read(CHUNK):
            out.write(chunk)
    expected = resp.headers.get("Content-Length")
    if expected is not None and resp.status == 200 and part.stat().st_size != int(expected):
        raise SourceUnavailable(f"{url}: got {part.stat().st_size} of {expected} bytes")
    part.replace(dest)


def fetch(location: str, root: Path, *, s3: Callable[[], S3Client] = S3Client.from_env,
          ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """Download one source under `root`, the job's own folder on its volume (or reuse it);
    returns its status.sources
    entry: location, path, sha256, bytes."""
    target = root / layout.remote_source(location)
    folder = target.parent
    manifest = _reusable(folder, location)
    if manifest is not None:
        log.info("%s: reusing the copy in %s (sha256 %s)", location, target, manifest["sha256"])
        return _entry(manifest)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    started = time.monotonic()
    files: dict[str, dict[str, Any]] = {}
    if parse_source(location).scheme == S3:
        client = s3()
        bucket = parse_source(location).authority
        try:
            for key, rel, size in _s3_objects(client, location):
                dest = target / rel if rel else target
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download(bucket, key, dest, size)
                files[str(dest.relative_to(folder))] = {"bytes": size, "sha256": _sha256(dest)}
        except ObjectStoreError as exc:
            if exc.status in (401, 403, 404):
                raise ConfigError(str(exc)) from None
            raise SourceUnavailable(str(exc)) from None
    else:
        _https_download(location, target, ssl_context or ssl.create_default_context())
        files[target.name] = {"bytes": target.stat().st_size, "sha256": _sha256(target)}
    if len(files) == 1 and next(iter(files)) == target.name:
        digest = files[target.name]["sha256"]
    else:
        digest = hashlib.sha256("".join(
            f"{rel.split('/', 1)[1]} {info['sha256']}\n" for rel, info in sorted(files.items())
        ).encode()).hexdigest()
    manifest = {"location": location, "path": str(target), "sha256": digest,
                "bytes": sum(f["bytes"] for f in files.values()), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("%s: downloaded %d file(s), %d bytes in %.1fs, sha256 %s", location, len(files),
             manifest["bytes"], time.monotonic() - started, digest)
    return _entry(manifest)


def _entry(manifest: dict[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in ("location", "path", "sha256", "bytes")}


def fetch_sources(cfg: TrainerConfig, *, is_main: bool, wait_timeout: float = 6 * 3600) -> list[dict[str, Any]]:
    """Every remote source of the config, downloaded by the main rank; the other ranks wait for
    its manifests (the job volume is shared)."""
    root = cfg.paths.job_root
    locations = remote_locations(cfg)
    if is_main:
        return [fetch(loc, root) for loc in locations]
    deadline = time.monotonic() + wait_timeout
    out = []
    for loc in locations:
        folder = root / layout.remote_source_dir(loc)
        while (manifest := _reusable(folder, loc)) is None:
            if time.monotonic() > deadline:
                raise SourceUnavailable(f"{loc}: rank 0 did not finish downloading it")
            time.sleep(2)
        out.append(_entry(manifest))
    return out
