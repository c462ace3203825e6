"""The job volume's layout, shared by the operator (mounts, status paths) and the trainer.

| path under the mount | what |
| --- | --- |
| `data/` | datasets the user copied (`pvc://<job claim>/data/x.jsonl` resolves here) |
| `checkpoints/checkpoint-<step>/` | HF Trainer checkpoints; complete only with a `COMPLETE` marker |
| `artifacts/adapter/`, `artifacts/merged/` | the PEFT adapter; the merged or fully trained model |
| `reports/dataset.json`, `eval.json`, `summary.json` | reports |
| `data-cache/<digest>/` | the prepared (validated, cleaned, split) dataset |
| `artifacts/README.md`, `artifacts/loss.png` | the model card and its loss curve |
| `tracking/` | spec.tracking: TensorBoard event files, the W&B run folder, the MLflow run id |
| `sources/<digest>/<name>` | an s3:// or https:// source as downloaded (`manifest.json` beside it once complete) |

Every folder but `data/` and the Hugging Face cache is the job's own output. On a claim the
job owns (`<name>-workspace`) it sits at the top of the volume; on a claim several jobs may
share (`spec.storage.existingClaim`) it sits in `jobs/<job name>/` (`job_folder`), so two jobs
on one claim never see each other's checkpoints or adapters (a job re-created under the same
name finds its own again, as it does on a retained claim of its own).
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

# Where the job volume is mounted in trainer pods.
WORKSPACE = "/workspace"
# Where claims other than the job volume that pvc:// sources name are mounted, read-only.
OTHER_CLAIMS_DIR = "/mnt/claims"

DATA = "data"
CHECKPOINTS = "checkpoints"
ARTIFACTS = "artifacts"
ADAPTER = f"{ARTIFACTS}/adapter"
MERGED = f"{ARTIFACTS}/merged"
REPORTS = "reports"
DATA_CACHE = "data-cache"
HF_CACHE = ".cache/huggingface"
TRACKING = "tracking"
SOURCES = "sources"


SHARED_CLAIM_JOBS = "jobs"


def job_folder(job_name: str, shared_claim: bool) -> str:
    """Where a job's outputs live on its volume, relative to the volume's top ("" = the top)."""
    return f"{SHARED_CLAIM_JOBS}/{job_name}" if shared_claim else ""


def under(root: str, relative: str) -> str:
    """`relative` (a folder of this layout, or a path on the volume) under a mount point."""
    return str(PurePosixPath(root) / relative) if relative else str(PurePosixPath(root))


def remote_source_dir(location: str) -> str:
    """The folder (relative to the volume) an s3:// or https:// source is downloaded into."""
    return f"{SOURCES}/{hashlib.sha256(location.encode()).hexdigest()[:16]}"


def remote_source(location: str) -> str:
    """Where a downloaded s3:// or https:// source is on the volume: a file, or a folder when
    the location names a prefix (`s3://bucket/models/tiny/`). Named after its last segment."""
    name = location.split("?", 1)[0].split("://", 1)[-1].rstrip("/").rsplit("/", 1)[-1] or "source"
    return f"{remote_source_dir(location)}/{name}"
