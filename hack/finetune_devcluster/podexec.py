"""Run one container's command inside a private mount namespace.

Started by the local node agent as `unshare -m --propagation private python -m
finetune_devcluster.podexec SPEC.json`: it bind-mounts the pod's volumes at their
mountPaths (read-only where asked), then execs the container's argv directly (no shell),
with no signal blocked or ignored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def _mount(src: str, dst: str, read_only: bool) -> None:
    s, d = Path(src), Path(dst)
    if s.is_dir():
        d.mkdir(parents=True, exist_ok=True)
    else:
        d.parent.mkdir(parents=True, exist_ok=True)
        d.touch(exist_ok=True)
    # --no-canonicalize: mount(8) would otherwise turn /proc/<pid>/fd/N back into a path,
    # which may by now lie under a folder covered by an earlier mount.
    subprocess.run(["mount", "--no-canonicalize", "--bind", str(s), str(d)], check=True)
    if read_only:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True)


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[0]).read_text())
    # Open every source before mounting anything: a mountPath such as /tmp may cover the
    # folder the other sources live in. Mount through /proc/<pid>/fd, parents first.
    mounts = sorted(spec["mounts"], key=lambda m: len(Path(m["target"]).parts))
    fds = [os.open(m["source"], os.O_PATH) for m in mounts]
    # Host folders the command itself needs (the Python environment, the project's source)
    # stay visible even when a mountPath such as /tmp covers them.
    keep = [(k, os.open(k, os.O_PATH)) for k in spec.get("keep", []) if Path(k).exists()]
    for m, fd in zip(mounts, fds):
        _mount(f"/proc/{os.getpid()}/fd/{fd}", m["target"], m.get("readOnly", False))
    for path, fd in keep:
        if any(Path(path).is_relative_to(m["target"]) for m in mounts):
            _mount(f"/proc/{os.getpid()}/fd/{fd}", path, read_only=False)
    if spec.get("workingDir"):
        Path(spec["workingDir"]).mkdir(parents=True, exist_ok=True)
        os.chdir(spec["workingDir"])
    command = spec["argv"]
    if not command:
        sys.exit("container has no command: the local node cannot read an image's entrypoint")
    _reset_signals()
    os.execvpe(command[0], command, spec["env"])


def _reset_signals() -> None:
    """Start the container's process with the signal state a container runtime gives it.

    A signal mask and ignored signals survive exec: the local node blocks SIGTERM and SIGINT
    (it waits for them with sigwait), and Python ignores SIGPIPE and SIGXFSZ. Left as they are,
    a pod would never see the SIGTERM of its deletion (the trainer would not checkpoint, and
    would run on until SIGKILL at the end of its grace period).
    """
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


if __name__ == "__main__":
    main(sys.argv[1:])
