"""`finetune-trainer launch`: torchrun under a supervisor that speaks the pod's language.

One launcher per pod (node). It starts torchrun's elastic agent, which starts one worker per
GPU running `finetune-trainer train`, and turns what happens into what the Job acts on:

- **Exit codes.** torchrun's own code says only "a worker failed"; the pod must exit 42
  (permanent: bad data or config, a diverging run; the Job fails at once) or 43 (retryable).
  Each worker writes its summary to a private file (`FINETUNE_WORKER_TERMINATION_DIR`); the
  launcher writes the pod's one termination message.
- **A permanent failure is not retried.** A worker that exits 42 first freezes its agent
  (SIGSTOP, before the agent can restart the worker group), and the launcher kills the
  agent and its workers. Across nodes the launchers share the rendezvous store: the first
  launcher that sees a 42 publishes the summary there, and every other launcher stops its
  node and exits 42 with that summary, so no node waits out a timeout or restarts the world.
- **SIGTERM** is forwarded to the agent with the pod's grace period (`--grace-seconds`,
  passed as torchrun's `--shutdown-timeout`; torchrun's own default is 30 s), so workers
  finish the step and write their checkpoint. The rendezvous stays open (torchrun does not
  close it on a signal), so the other nodes wait for the replacement pod.
- **Multi-node rendezvous** is torchrun's elastic c10d rendezvous. The launcher of node 0
  hosts the rendezvous store itself (the agents join with `is_host=false`), so the store
  outlives restarts of its agent; the endpoint is pod 0's name under the Job's headless
  Service. `--max-restarts` lets the group re-form when a node is lost: the survivors'
  workers fail (a collective times out after the process group's timeout, or the peer's
  connection drops), their agents restart them, and they wait (join timeout) for the Job's
  replacement pod to join with the same `--rdzv-id`. Losing pod 0 loses the store: the other
  pods then exit 43 and the Job restarts them with it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import exitcodes

log = logging.getLogger(__name__)

# Set in every worker's environment: the worker runs under this launcher.
ENV_UNDER_LAUNCHER = "FINETUNE_LAUNCHER"
ENV_WORKER_DIR = "FINETUNE_WORKER_TERMINATION_DIR"
# The process group's timeout for collectives (TrainingArguments.ddp_timeout): how long the
# survivors of a lost node wait in a collective before failing and re-forming the group.
ENV_COLLECTIVE_TIMEOUT = "FINETUNE_COLLECTIVE_TIMEOUT_SECONDS"
DEFAULT_COLLECTIVE_TIMEOUT = 600

PERMANENT_KEY = "finetune/permanent"
EXITED_KEY = "finetune/exited"
POLL_SECONDS = 0.1
# How long the launcher hosting the store waits for the other launchers to read a permanent
# failure (or to finish) before it exits and takes the store with it.
STORE_LINGER_SECONDS = 60.0


@dataclass(frozen=True)
class LaunchPlan:
    config: str
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "finetune"
    max_restarts: int = 0
    grace_seconds: int = 110
    local_addr: str | None = None
    join_timeout: int = 900

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1 or self.rdzv_endpoint is not None

    @property
    def hosts_store(self) -> bool:
        return self.multi_node and self.node_rank == 0


def torchrun_command(plan: LaunchPlan) -> list[str]:
    """torchrun's command line for a plan (a list: nothing here passes through a shell)."""
    command = [sys.executable, "-m", "torch.distributed.run",
               "--nproc-per-node", str(plan.nproc_per_node),
               "--shutdown-timeout", str(plan.grace_seconds),
               "--monitor-interval", "1"]
    if not plan.multi_node:
        command += ["--standalone", "--nnodes", "1"]
    else:
        if not plan.rdzv_endpoint:
            raise ValueError("--rdzv-endpoint is required with --nnodes above 1")
        command += ["--nnodes", f"{plan.nnodes}:{plan.nnodes}",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", plan.rdzv_endpoint,
                    "--rdzv-id", plan.rdzv_id, "--max-restarts", str(plan.max_restarts),
                    "--rdzv-conf", f"is_host=false,join_timeout={plan.join_timeout},"
                                   "keep_alive_interval=5,keep_alive_max_attempt=6"]
        if plan.local_addr:
            command += ["--local-addr", plan.local_addr]
    return command + ["-m", "finetune_trainer", "train", "--config", plan.config]


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


class _SharedStore:
    """The rendezvous store, as the launchers use it to tell each other about a permanent
    failure. Node 0 hosts it; the others connect when it is reachable."""

    def __init__(self, plan: LaunchPlan):
        self.plan = plan
        self.store = None
        self._next_try = 0.0
        if plan.hosts_store:
            from datetime import timedelta

            from torch.distributed import TCPStore

            host, port = _split_endpoint(plan.rdzv_endpoint)
            self.store = TCPStore(host, port, is_master=True, multi_tenant=True,
                                  wait_for_workers=False, timeout=timedelta(seconds=60))
            log.info("hosting the rendezvous store on port %d", port)

    def _connected(self):
        if self.store is None and self.plan.multi_node and time.monotonic() >= self._next_try:
            self._next_try = time.monotonic() + 2.0
            from datetime import timedelta

            from torch.distributed import TCPStore

            host, port = _split_endpoint(self.plan.rdzv_endpoint)
            try:
                # A plain connection first: TCPStore logs every failed attempt at length.
                socket.create_connection((host, port), timeout=1).close()
                self.store = TCPStore(host, port, is_master=False, wait_for_workers=False,
                                      timeout=timedelta(seconds=5))
            except Exception:  # noqa: BLE001 - not up yet; the next poll tries again
                self.store = None
        return self.store

    def permanent(self) -> dict[str, Any] | None:
        store = self._connected()
        if store is None:
            return None
        try:
            if store.check([PERMANENT_KEY]):
                return json.loads(store.get(PERMANENT_KEY))
        except Exception:  # noqa: BLE001 - a store that went away has nothing to tell
            return None
        return None

    def publish_permanent(self, summary: dict[str, Any]) -> None:
        store = self._connected()
        if store is None:
            return
        try:
            store.compare_set(PERMANENT_KEY, "", json.dumps(summary, default=str))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not tell the other nodes about the permanent failure: %s", exc)

    def leave(self, *, linger: bool) -> None:
        """Count this launcher out; the host waits (bounded) for the others first."""
        store = self._connected() if self.plan.multi_node else None
        if store is None:
            return
        try:
            exited = store.add(EXITED_KEY, 1)
            deadline = time.monotonic() + STORE_LINGER_SECONDS
            while linger and self.plan.hosts_store and exited < self.plan.nnodes \
                    and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
                exited = store.add(EXITED_KEY, 0)
        except Exception:  # noqa: BLE001
            pass


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_tree(proc: subprocess.Popen) -> None:
    """Freeze the agent (it must not restart the workers), then kill its workers and it.
    Workers run in sessions of their own, so they are found as the agent's descendants."""
    try:
        proc.send_signal(signal.SIGSTOP)
    except ProcessLookupError:
        pass
    for child in _descendants(proc.pid):
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _worker_summaries(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            pass  # being written
    return out


def run(plan: LaunchPlan) -> int:
    """Run the plan; return the pod's exit code after writing its termination message."""
    from .reporting import write_termination_message

    store = _SharedStore(plan)
    with tempfile.TemporaryDirectory(prefix="finetune-workers-") as tmp:
        folder = Path(tmp)
        env = dict(os.environ, **{ENV_WORKER_DIR: tmp, ENV_UNDER_LAUNCHER: "1"})
        env.setdefault(ENV_COLLECTIVE_TIMEOUT, str(DEFAULT_COLLECTIVE_TIMEOUT))
        if plan.multi_node:
            # NCCL: a failed or timed-out collective tears the worker down instead of hanging.
            env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            env.setdefault("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "300")
        command = torchrun_command(plan)
        log.info("launching: %s", " ".join(command))
        proc = subprocess.Popen(command, env=env)
        terminated: list[int] = []

        def forward(signum, frame):
            terminated.append(signum)
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

        previous = signal.signal(signal.SIGTERM, forward)
        permanent: dict[str, Any] | None = None
        try:
            while proc.poll() is None:
                local = [s for s in _worker_summaries(folder) if s.get("exitCode") == exitcodes.PERMANENT]
                if local:
                    permanent = local[0]
                    store.publish_permanent(dict(permanent, node=plan.node_rank))
                elif not terminated:
                    permanent = store.permanent()
                if permanent is not None:
                    _kill_tree(proc)
                    break
                time.sleep(POLL_SECONDS)
        finally:
            signal.signal(signal.SIGTERM, previous)
        returncode = proc.wait()
        summaries = _worker_summaries(folder)
    if permanent is None:
        permanent = next((s for s in summaries if s.get("exitCode") == exitcodes.PERMANENT), None)
    if permanent is None and returncode != 0 and not terminated:
        permanent = store.permanent()  # a peer's failure that ended our workers first
    if permanent is not None:
        store.publish_permanent(dict(permanent, node=plan.node_rank))
        write_termination_message(dict(permanent, exitCode=exitcodes.PERMANENT))
        store.leave(linger=True)
        return exitcodes.PERMANENT
    if returncode == 0 and not terminated:
        write_termination_message(next((s for s in summaries if s.get("rank") == 0),
                                       {"reason": "Succeeded", "exitCode": exitcodes.SUCCESS}))
        store.leave(linger=True)
        return exitcodes.SUCCESS
    failures = [s for s in summaries if s.get("exitCode") not in (None, exitcodes.SUCCESS)]
    summary = failures[0] if failures else {
        "reason": "Terminated" if terminated else "Error",
        "message": "stopped by SIGTERM" if terminated else f"torchrun exited with {returncode}"}
    write_termination_message(dict(summary, exitCode=exitcodes.RETRYABLE))
    store.leave(linger=False)
    return exitcodes.RETRYABLE


def freeze_agent_on_permanent_failure() -> None:
    """Called by a worker about to exit 42 under the launcher: stop torchrun's agent (the
    worker's parent) before it sees the exit and restarts the worker group; the launcher
    then kills it."""
    if os.environ.get(ENV_UNDER_LAUNCHER) == "1" and "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            os.kill(os.getppid(), signal.SIGSTOP)
        except OSError:
            pass
