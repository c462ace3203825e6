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
"""

from __future__ import annotations

from pathlib import PurePosixPath

# Where the job volume is mounted in trainer pods.
WORKSPACE = "/workspace"
# Where claims other than the job volume that pvc:// sources name are mounted, read-only.
OTHER_CLAIMS_DIR = "/mnt/claims"
# Where the folder of spec.output.resultsFile on another claim is mounted, writable.
RESULTS_DIR = "/mnt/results"

DATA = "data"
CHECKPOINTS = "checkpoints"
ARTIFACTS = "artifacts"
ADAPTER = f"{ARTIFACTS}/adapter"
MERGED = f"{ARTIFACTS}/merged"
REPORTS = "reports"
DATA_CACHE = "data-cache"
HF_CACHE = ".cache/huggingface"
TRACKING = "tracking"


def under(root: str, relative: str) -> str:
    """`relative` (a folder of this layout, or a path on the volume) under a mount point."""
    return str(PurePosixPath(root) / relative) if relative else str(PurePosixPath(root))
