"""Checkpoints on the job volume: when one is complete, which to resume from, which to keep.

The HF Trainer writes `checkpoint-<step>/` folders. A pod killed while writing one leaves a
folder that looks fine and is not, so a checkpoint counts only once a `COMPLETE` marker is
written last, after every file in it was fsynced. The marker holds a manifest (file names
and sizes), so a file truncated afterwards (a full disk, a bad copy) is caught too.

No heavy imports here: the operator's tests and `finetune-trainer` tools read checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PREFIX = "checkpoint-"
# Quarantined folders do not start with "checkpoint-", so nothing mistakes them for one.
QUARANTINE_PREFIX = "incomplete-"
QUARANTINE_KEEP = 2

_STEP = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def checkpoint_step(path: Path) -> int | None:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: str | os.PathLike) -> list[Checkpoint]:
    """Every `checkpoint-<step>` folder under root, oldest step first, complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir():
            found.append(Checkpoint(child, step))
    return sorted(found, key=lambda c: c.step)


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _manifest(folder: Path) -> dict[str, int]:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER:
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


def mark_complete(folder: str | os.PathLike, *, step: int | None = None) -> Path:
    """Fsync every file of a checkpoint, then write its COMPLETE marker atomically."""
    folder = Path(folder)
    files = _manifest(folder)
    for rel in files:
        _fsync_path(folder / rel)
    for sub in {folder / rel for rel in files}:
        _fsync_path(sub.parent)
    marker = folder / COMPLETE_MARKER
    tmp = folder / f".{COMPLETE_MARKER}.tmp"
    payload = {"step": step if step is not None else checkpoint_step(folder),
               "createdAt": time.time(), "files": files}
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, marker)
    _fsync_path(folder)
    return marker


def verify(folder: str | os.PathLike) -> str | None:
    """None when the checkpoint is complete and intact, else why it is not."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return "no COMPLETE marker (the writer was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable COMPLETE marker: {exc}"
    if not files:
        return "empty manifest"
    for rel, size in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{rel} is {actual} bytes, the manifest says {size}"
    return None


def quarantine(checkpoint: Checkpoint, reason: str) -> Path:
    """Move an unusable checkpoint aside (kept for a post-mortem, never resumed from)."""
    target = checkpoint.path.with_name(
        f"{QUARANTINE_PREFIX}{checkpoint.path.name}-{int(time.time() * 1000)}")
    log.warning("skipping checkpoint %s: %s; moved to %s", checkpoint.path, reason, target.name)
    checkpoint.path.rename(target)
    return target


def _prune_quarantine(root: Path) -> None:
    old = sorted((p for p in root.iterdir() if p.name.startswith(QUARANTINE_PREFIX)),
                 key=lambda p: p.stat().st_mtime)
    for path in old[:-QUARANTINE_KEEP] if len(old) > QUARANTINE_KEEP else []:
        shutil.rmtree(path, ignore_errors=True)


def find_resumable(root: str | os.PathLike, *, quarantine_bad: bool = True) -> Checkpoint | None:
    """The newest complete checkpoint under root; incomplete newer ones are moved aside.

    Only the process that owns the volume (rank 0) should quarantine; others pass
    `quarantine_bad=False` and just skip.
    """
    root = Path(root)
    newest_good = None
    for checkpoint in reversed(list_checkpoints(root)):
        problem = verify(checkpoint.path)
        if problem is None:
            newest_good = newest_good or checkpoint
            continue
        if newest_good is None or checkpoint.step > newest_good.step:
            if quarantine_bad:
                quarantine(checkpoint, problem)
            else:
                log.warning("skipping checkpoint %s: %s", checkpoint.path, problem)
    if quarantine_bad and root.is_dir():
        _prune_quarantine(root)
    return newest_good


def agreed_resumable(root: str | os.PathLike, *, is_main: bool) -> Checkpoint | None:
    """The checkpoint every rank resumes from: rank 0's choice, broadcast to the others.

    Ranks on other nodes may see the volume differently (a checkpoint completing between two
    listings, a cache that lags); each choosing for itself would start the ranks at different
    steps. Without torch.distributed this is `find_resumable`.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return find_resumable(root, quarantine_bad=is_main)
    mine = find_resumable(root, quarantine_bad=True) if dist.get_rank() == 0 else None
    box = [(str(mine.path), mine.step) if mine else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None
    path, step = box[0]
    return Checkpoint(Path(path), step)


def rotate(root: str | os.PathLike, *, keep_last: int | None, best: str | os.PathLike | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, always keeping the best.

    Incomplete folders older than the newest complete one are leftovers and go too.
    """
    checkpoints = list_checkpoints(root)
    complete = [c for c in checkpoints if (c.path / COMPLETE_MARKER).is_file()]
    if not complete:
        return []
    kept = complete[-keep_last:] if keep_last and keep_last > 0 else complete
    keep = {c.path.name for c in kept}
    if best:
        keep.add(Path(best).name)
    newest_complete = complete[-1].step
    removed = []
    for checkpoint in checkpoints:
        if checkpoint.path.name in keep or checkpoint.step > newest_complete:
            continue  # a newer folder may be being written right now
        shutil.rmtree(checkpoint.path, ignore_errors=True)
        removed.append(checkpoint.path)
    return removed


# Logged values a kept checkpoint reports, by the key its trainer_state.json logs them under.
SUMMARY_METRICS = {"loss": "trainLoss", "eval_loss": "evalLoss", "mean_token_accuracy": "meanTokenAccuracy",
                   "eval_mean_token_accuracy": "evalMeanTokenAccuracy"}
SUMMARY_MAX = 100


def kept_summary(root: str | os.PathLike) -> list[dict]:
    """Every complete checkpoint, oldest first (the newest SUMMARY_MAX), with its step, when it
    was marked complete and the metrics logged last before it (from its own trainer_state.json,
    so a restarted pod reports checkpoints an earlier pod saved)."""
    out = []
    for checkpoint in list_checkpoints(root)[::-1]:
        marker = checkpoint.path / COMPLETE_MARKER
        if len(out) == SUMMARY_MAX or not marker.is_file():
            continue
        entry: dict = {"step": checkpoint.step}
        try:
            created = json.loads(marker.read_text()).get("createdAt")
        except (OSError, ValueError, AttributeError):
            created = None
        if isinstance(created, (int, float)):
            entry["savedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
        try:
            history = json.loads((checkpoint.path / "trainer_state.json").read_text()).get("log_history") or []
        except (OSError, ValueError, AttributeError):
            history = []
        for logged in history:
            if isinstance(logged, dict) and logged.get("step", 0) <= checkpoint.step:
                entry.update({ours: float(logged[key]) for key, ours in SUMMARY_METRICS.items()
                              if isinstance(logged.get(key), (int, float))})
        out.append(entry)
    return out[::-1]
