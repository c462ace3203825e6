"""Uploaded files in object storage (`--files-store s3://bucket/prefix`), for clusters without a
shared ReadWriteMany claim.

Layout, per namespace: `<prefix>/<ns>/files/<id>.jsonl` beside `<prefix>/<ns>/files/<id>.json`
(its OpenAI `file` object), and a job's result file at `<prefix>/<ns>/results/<job id>/results.csv`,
which its trainer uploads (spec.output.resultsFile).

Credentials are per namespace, never the API's own: the Secret named `--files-store-secret` in
the caller's namespace holds the AWS SDKs' standard keys (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, optional AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL). The API reads
that one Secret (its RBAC names it, nothing else) to store and read the namespace's uploads, and
the FineTuneJobs it creates name the same Secret in spec.objectStorage.secretRef, so the trainer
reads them with the same credentials. A platform team scopes each namespace's keys to its own
prefix; a namespace without the Secret gets a clear 400, and nothing is stored.
"""

from __future__ import annotations

import base64
import json
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Optional

from finetune_api.sources import parse_source
from finetune_trainer.objectstore import Credentials, ObjectStoreError, S3Client

from .errors import ApiError, bad_request, not_found, too_many
from .files import FORMAT_KEY, RESULTS, RESULTS_NAME, Upload, public, result_record_of, training_data
from .mapping import FILE_ID, DataFile

SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL")


class ObjectFileStore:
    def __init__(self, location: str, secret_name: str, kube, *, endpoint: Optional[str] = None,
                 scratch: Optional[Path] = None, max_stored_bytes: int, max_file_bytes: int) -> None:
        source = parse_source(location)
        if source.scheme != "s3" or not source.authority:
            raise ValueError(f"--files-store {location!r}: expected s3://bucket[/prefix]")
        self.bucket = source.authority
        self.prefix = source.path
        self.secret_name = secret_name
        self.kube = kube
        self.endpoint = endpoint
        self.scratch = Path(scratch or tempfile.gettempdir())
        self.max_stored_bytes = max_stored_bytes
        self.max_file_bytes = max_file_bytes

    # where things are --------------------------------------------------------------------------
    def _key(self, namespace: str, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, namespace, *parts) if p)

    def _file_keys(self, namespace: str, file_id: str) -> tuple[str, str]:
        if not FILE_ID.match(file_id):
            raise not_found("file", file_id, param="file_id")
        return self._key(namespace, "files", f"{file_id}.jsonl"), self._key(namespace, "files", f"{file_id}.json")

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def client(self, namespace: str) -> S3Client:
        """An S3 client with the namespace's own credentials (its Secret), or a 400 saying how
        to configure them."""
        secret = self.kube.get_secret(namespace, self.secret_name)
        data = {k: base64.b64decode(v).decode() for k, v in ((secret or {}).get("data") or {}).items()
                if k in SECRET_KEYS}
        if not data.get("AWS_ACCESS_KEY_ID") or not data.get("AWS_SECRET_ACCESS_KEY"):
            raise bad_request(
                f"uploads in namespace {namespace} are stored in object storage with the credentials of "
                f"the Secret {self.secret_name!r} in that namespace (keys AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY), which {'lacks them' if secret else 'does not exist'}; ask the "
                "platform team to create it", param=None, code="object_storage_not_configured")
        return S3Client(self.endpoint or data.get("AWS_ENDPOINT_URL"), data.get("AWS_REGION"),
                        Credentials(data["AWS_ACCESS_KEY_ID"], data["AWS_SECRET_ACCESS_KEY"],
                                    data.get("AWS_SESSION_TOKEN", "")))

    # files -------------------------------------------------------------------------------------
    def stored_bytes(self, namespace: str) -> int:
        return sum(o.size for o in _store(lambda: list(self.client(namespace).list(
            self.bucket, self._key(namespace, "files") + "/"))) if o.key.endswith(".jsonl"))

    def new_upload(self, namespace: str) -> Upload:
        room = self.max_stored_bytes - self.stored_bytes(namespace)
        if room <= 0:
            raise too_many(f"namespace {namespace} already stores {self.max_stored_bytes} bytes of files, "
                           "its limit; delete files first", "quota_exceeded")
        self.scratch.mkdir(parents=True, exist_ok=True)
        return Upload(self.scratch, min(room, self.max_file_bytes), room < self.max_file_bytes)

    def commit(self, namespace: str, upload: Upload, *, file_id: str, filename: str, purpose: str,
               fmt: str) -> dict:
        data, meta = self._file_keys(namespace, file_id)
        record = {"object": "file", "id": file_id, "bytes": upload.size, "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
                  "expires_at": None, FORMAT_KEY: fmt}
        s3 = self.client(namespace)
        try:
            _store(lambda: s3.upload(self.bucket, data, upload.path))
            # The record last: a file is listed only once its content is complete.
            _store(lambda: s3.put_bytes(self.bucket, meta, json.dumps(record).encode()))
        finally:
            upload.discard()
        return public(record)

    def get(self, namespace: str, file_id: str, s3: Optional[S3Client] = None) -> dict:
        _, meta = self._file_keys(namespace, file_id)
        s3 = s3 or self.client(namespace)
        try:
            return json.loads(s3.get_bytes(self.bucket, meta))
        except ObjectStoreError as exc:
            if exc.status == 404:
                raise not_found("file", file_id, param="file_id") from None
            raise _unavailable(exc) from None

    def open_content(self, namespace: str, file_id: str) -> BinaryIO:
        s3 = self.client(namespace)
        self.get(namespace, file_id, s3)
        return _store(lambda: s3.open(self.bucket, self._file_keys(namespace, file_id)[0]))

    def list(self, namespace: str) -> list[dict]:
        s3 = self.client(namespace)
        metas = [o.key for o in _store(lambda: list(s3.list(self.bucket, self._key(namespace, "files") + "/")))
                 if o.key.endswith(".json")]
        records = [json.loads(_store(lambda k=k: s3.get_bytes(self.bucket, k))) for k in metas]
        return sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def delete(self, namespace: str, file_id: str) -> None:
        data, meta = self._file_keys(namespace, file_id)
        s3 = self.client(namespace)
        self.get(namespace, file_id, s3)
        _store(lambda: s3.delete(self.bucket, meta))  # unlisted first, then its content
        _store(lambda: s3.delete(self.bucket, data))

    def data_file(self, namespace: str, file_id: str, param: str) -> DataFile:
        return training_data(self, namespace, file_id, param, self._uri(self._file_keys(namespace, file_id)[0]))

    # result files ------------------------------------------------------------------------------
    def results_location(self, namespace: str, job_id: str) -> str:
        return self._uri(self._key(namespace, RESULTS, job_id, RESULTS_NAME))

    def result_record(self, namespace: str, job_id: str) -> Optional[dict]:
        info = _store(lambda: self.client(namespace).head(self.bucket, self._key(namespace, RESULTS, job_id,
                                                                                   RESULTS_NAME)))
        return None if info is None else result_record_of(job_id, info.size, int(time.time()))

    def open_results(self, namespace: str, job_id: str) -> BinaryIO:
        return _store(lambda: self.client(namespace).open(self.bucket, self._key(namespace, RESULTS, job_id,
                                                                                   RESULTS_NAME)))


def _unavailable(exc: ObjectStoreError) -> ApiError:
    # The store's message names the operation, the location and its error code, never a credential.
    return ApiError(503 if exc.status in (0, 500, 502, 503, 504) else 500, f"object storage: {exc}",
                    code="object_storage_error")


def _store(fn):
    try:
        return fn()
    except ObjectStoreError as exc:
        raise _unavailable(exc) from None
