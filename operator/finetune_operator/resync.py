"""One resync loop for all FineTuneJobs, instead of a kopf timer per job.

Some of a job's status moves with time alone, not with an event: GPU hours and cost grow,
ttlSecondsAfterFinished runs out, a failed deployment is to be tried again. Every
`--resync-seconds` this loop refreshes the jobs that `due` says may have changed that way
(finetunejob.due_for_resync: a running job once a minute, a finished one when its TTL runs
out), from the watch cache, through a few threads of its own. Everything else is an event's:
a trainer Job or pod event, or a FineTuneJob write the operator did not make (the trainer's
progress, an approval), marks its job (`soon`).

A timer per job ran 1,000 concurrent kopf timers at N=1000 and put one refresh per job per
interval onto the handlers' executor, where they starved the spec handlers of new jobs (the
operator created 75 trainer Jobs in 7 minutes at N=300 on a loaded machine). Here a job whose
refresh is still queued or running is not queued again, new jobs are left to their spec
handler until admitted, and the loop never competes with the handlers' threads.

Trainer Job and pod events only mark their job (`soon`): one refresh per job drains a burst of
them half a second later, on threads of its own, so the handlers' threads go back to kopf at
once instead of waiting for the status write.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger("finetune_operator.resync")
Key = tuple[str, str]


class Resync:
    """The periodic pass, plus `soon()`: the refresh a trainer Job or pod event asks for."""

    def __init__(self, interval: float, due: Callable[[], Iterable[Key]],
                 refresh: Callable[[str, str], None], workers: int = 4, event_workers: int = 16,
                 delay: float = 0.5, prune: Callable[[], object] | None = None) -> None:
        self.interval = interval
        self.due = due
        # Called on every pass: drops what is kept in memory for jobs that are gone.
        self.prune = prune
        self.refresh = refresh
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resync")
        self._pending: set[Key] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._context: contextvars.Context | None = None
        # Events: a job's events within `delay` of each other cost one refresh (a pod created,
        # scheduled and started in a burst is one status write); an event during the refresh
        # brings another one after it, so nothing an event reported is missed.
        self.delay = delay
        self._events_pool = concurrent.futures.ThreadPoolExecutor(max_workers=event_workers,
                                                                  thread_name_prefix="refresh")
        self._scheduled: dict[Key, float] = {}
        self._heap: list[tuple[float, Key]] = []
        self._wake = threading.Condition()
        self._scheduler: threading.Thread | None = None

    def start(self, context: contextvars.Context) -> None:
        """`context`: a handler's, so that kopf's event posting works from these threads."""
        self._context = context
        self._thread = threading.Thread(target=self._run, name="resync", daemon=True)
        self._thread.start()
        self._scheduler = threading.Thread(target=self._schedule, name="refresh-scheduler", daemon=True)
        self._scheduler.start()

    def soon(self, namespace: str, name: str) -> None:
        """Refresh this job `delay` seconds from now, unless one is already scheduled."""
        key = (namespace, name)
        with self._wake:
            if key in self._scheduled:
                return
            at = time.monotonic() + self.delay
            self._scheduled[key] = at
            heapq.heappush(self._heap, (at, key))
            self._wake.notify()

    def _schedule(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                while not self._heap and not self._stop.is_set():
                    self._wake.wait(1.0)
                if self._stop.is_set():
                    return
                at, key = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    continue
                heapq.heappop(self._heap)
                del self._scheduled[key]  # an event from now on schedules the next refresh
            self._events_pool.submit(self._run_refresh, key)

    def _run_refresh(self, key: Key) -> None:
        try:
            context = self._context.copy() if self._context is not None else contextvars.copy_context()
            context.run(self.refresh, *key)
        except Exception as e:  # noqa: BLE001 - the next event or pass tries again
            log.warning("%s/%s: refresh failed: %s", key[0], key[1], e)

    @property
    def started(self) -> bool:
        return self._thread is not None

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._events_pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.prune is not None:
                    self.prune()
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("resync pass failed")

    def tick(self) -> int:
        """Queue a refresh of every due job not already queued; returns how many were queued."""
        queued = 0
        for key in self.due():
            with self._guard:
                if key in self._pending:
                    continue
                self._pending.add(key)
            self._pool.submit(self._refresh, key)
            queued += 1
        return queued

    def _refresh(self, key: Key) -> None:
        try:
            self._run_refresh(key)
        finally:
            with self._guard:
                self._pending.discard(key)
