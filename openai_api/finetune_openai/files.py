"""Uploaded files, on the claim the trainer mounts, checked with the trainer's own validator.

Layout: the API's files folder holds one folder per namespace, which is the root of the claim
named `--files-claim` in that namespace (in the dev cluster the claim is bound to a
PersistentVolume whose hostPath is that folder; in a cluster, to that namespace's folder of a
shared ReadWriteMany share the API mounts). A file is `<ns>/files/<id>.jsonl` beside
`<ns>/files/<id>.json` (its OpenAI `file` object), so a FineTuneJob reads it as
`pvc://<claim>/files/<id>.jsonl`. A job's trainer writes its result file to
`<ns>/results/<job id>/results.csv` (its only writable place on the claim).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Optional

from .errors import ApiError, bad_request, not_found, too_many
from .mapping import FILE_ID, DataFile, result_file_id

FORMAT_KEY = "x_format"  # our record format, kept beside the OpenAI fields
ERRORS_SHOWN = 5


class FileStore:
    """Uploads on a claim. `secret_name` (the Secret a job needs to read them) is None here;
    `objectfiles.ObjectFileStore` is the same interface over object storage."""

    secret_name: Optional[str] = None

    def __init__(self, root: Path, claim: str, *, max_stored_bytes: int, max_file_bytes: int) -> None:
        self.root = Path(root)
        self.claim = claim
        self.max_stored_bytes = max_stored_bytes
        self.max_file_bytes = max_file_bytes

    def folder(self, namespace: str) -> Path:
        return self.root / namespace / "files"

    def _paths(self, namespace: str, file_id: str) -> tuple[Path, Path]:
        if not FILE_ID.match(file_id):
            raise not_found("file", file_id, param="file_id")
        folder = self.folder(namespace)
        return folder / f"{file_id}.jsonl", folder / f"{file_id}.json"

    def stored_bytes(self, namespace: str) -> int:
        folder = self.folder(namespace)
        return sum(p.stat().st_size for p in folder.glob("*.jsonl")) if folder.is_dir() else 0

    def new_upload(self, namespace: str) -> "Upload":
        folder = self.folder(namespace)
        folder.mkdir(parents=True, exist_ok=True)
        room = self.max_stored_bytes - self.stored_bytes(namespace)
        if room <= 0:
            raise too_many(f"namespace {namespace} already stores {self.max_stored_bytes} bytes of files, "
                           "its limit; delete files first", "quota_exceeded")
        return Upload(folder, min(room, self.max_file_bytes), room < self.max_file_bytes)

    def commit(self, namespace: str, upload: "Upload", *, file_id: str, filename: str, purpose: str,
               fmt: str) -> dict:
        data, meta = self._paths(namespace, file_id)
        record = {"object": "file", "id": file_id, "bytes": upload.size, "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
                  "expires_at": None, FORMAT_KEY: fmt}
        os.chmod(upload.path, 0o644)  # the trainer runs as another user and reads it
        os.replace(upload.path, data)
        tmp = meta.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, meta)
        return public(record)

    def get(self, namespace: str, file_id: str) -> dict:
        _, meta = self._paths(namespace, file_id)
        try:
            return json.loads(meta.read_text())
        except FileNotFoundError:
            raise not_found("file", file_id, param="file_id") from None

    def open_content(self, namespace: str, file_id: str) -> BinaryIO:
        self.get(namespace, file_id)
        return open(self._paths(namespace, file_id)[0], "rb")

    def list(self, namespace: str) -> list[dict]:
        folder = self.folder(namespace)
        records = [json.loads(p.read_text()) for p in folder.glob("file-*.json")] if folder.is_dir() else []
        return sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def delete(self, namespace: str, file_id: str) -> None:
        data, meta = self._paths(namespace, file_id)
        self.get(namespace, file_id)
        meta.unlink(missing_ok=True)
        data.unlink(missing_ok=True)

    def data_file(self, namespace: str, file_id: str, param: str) -> DataFile:
        return training_data(self, namespace, file_id, param, f"pvc://{self.claim}/files/{file_id}.jsonl")

    # Result files: results.csv that a job's trainer writes (spec.output.resultsFile) on this
    # claim at results/<job id>/, read back as a `file` with purpose fine-tune-results.
    def results_location(self, namespace: str, job_id: str) -> str:
        return f"pvc://{self.claim}/{RESULTS}/{job_id}/{RESULTS_NAME}"

    def results_path(self, namespace: str, job_id: str) -> Path:
        return self.root / namespace / RESULTS / job_id / RESULTS_NAME

    def result_record(self, namespace: str, job_id: str) -> Optional[dict]:
        """The `file` object of a job's results, or None while the trainer has written none."""
        try:
            stat = self.results_path(namespace, job_id).stat()
        except FileNotFoundError:
            return None
        return result_record_of(job_id, stat.st_size, int(stat.st_mtime))

    def open_results(self, namespace: str, job_id: str) -> BinaryIO:
        return open(self.results_path(namespace, job_id), "rb")


def training_data(store, namespace: str, file_id: str, param: str, location: str) -> DataFile:
    """The upload a job request names as `param` (training_file, validation_file), read from
    either store, as the DataFile the job reads at `location`; a 400 naming the parameter when
    it is not a fine-tune file of this namespace."""
    try:
        record = store.get(namespace, file_id)
    except ApiError as e:
        if e.status != 404:
            raise
        raise bad_request(f"invalid {param}: {file_id} (no such file in this namespace)",
                          param=param, code=f"invalid_{param}") from None
    if record.get("purpose") != "fine-tune":
        raise bad_request(f"invalid {param}: {file_id} was uploaded with purpose {record.get('purpose')!r}, "
                          "not 'fine-tune'", param=param, code=f"invalid_{param}")
    return DataFile(file_id, location, record[FORMAT_KEY])


def result_record_of(job_id: str, size: int, created_at: int) -> dict:
    return {"object": "file", "id": result_file_id(job_id), "bytes": size, "created_at": created_at,
            "filename": "step_metrics.csv", "purpose": "fine-tune-results", "status": "processed",
            "status_details": None, "expires_at": None}


RESULTS, RESULTS_NAME = "results", "results.csv"


def public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != FORMAT_KEY}


class Upload:
    """A file being received: written to a temporary file in the namespace's folder."""

    def __init__(self, folder: Path, limit: int, quota_bound: bool) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
        self.file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self.limit = limit
        self.quota_bound = quota_bound
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self.discard()
            if self.quota_bound:
                raise too_many("the upload would exceed the namespace's limit on stored bytes; delete "
                               "files first", "quota_exceeded")
            raise ApiError(413, f"the file is larger than the limit of {self.limit} bytes", code="file_too_large",
                           param="file")
        self.file.write(chunk)

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.path.unlink(missing_ok=True)


def detect_format(path: Path) -> str:
    """The trainer's record format of an OpenAI fine-tuning file, from its first JSON object."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue  # the validator names the line
            if isinstance(record, dict):
                if "messages" in record:
                    return "chat"
                if "preferred_output" in record or "non_preferred_output" in record:
                    return "preference"
                if "prompt" in record and "completion" in record:
                    return "completion"
                return "chat"
    return "chat"


def validate(path: Path, fmt: str) -> None:
    """Refuse a file any line of which the trainer would reject, naming the lines (400)."""
    from finetune_trainer.config import DATASET_FORMATS, DatasetConfig, DedupConfig
    from finetune_trainer.data import inspect_dataset

    if fmt not in DATASET_FORMATS:
        raise bad_request(f"the file holds {fmt} records ({'input/preferred_output/non_preferred_output' if fmt == 'preference' else fmt}), "
                          "which this operator version cannot train on yet", param="file",
                          code="invalid_file_format")
    cfg = DatasetConfig(source=str(path), format=fmt, dedup=DedupConfig(exact=False, near_threshold=0),
                        min_examples=1, max_invalid_fraction=0.0, eval_fraction=0.0)
    report = inspect_dataset(cfg, seed=0, max_seq_length=1 << 30).report
    if report.first_errors or not report.usable:
        shown = report.first_errors[:ERRORS_SHOWN] or report.problems[:ERRORS_SHOWN]
        more = report.rejected - len(shown) if report.first_errors else 0
        message = "Invalid file format. " + "; ".join(shown) + (f" (and {more} more)" if more > 0 else "")
        raise bad_request(message, param="file", code="invalid_file_format")


def upload_error(message: str, *, param: Optional[str] = "file") -> ApiError:
    return bad_request(message, param=param)
