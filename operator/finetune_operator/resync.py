"""One resync loop for all FineTuneJobs, instead of a kopf timer per job.

Some of a job's status moves with time alone, not with an event: GPU hours and cost grow, the
trainer's own progress reports (written by the trainer, not watched by a handler) move the
phase to Training, ttlSecondsAfterFinished runs out. Every `--resync-seconds` this loop
refreshes the jobs that can still change that way (not finished, or with a TTL to run out),
from the watch cache, through a few threads of its own.

A timer per job ran 1,000 concurrent kopf timers at N=1000 and put one refresh per job per
interval onto the handlers' executor, where they starved the spec handlers of new jobs (the
operator created 75 trainer Jobs in 7 minutes at N=300 on a loaded machine). Here a job whose
refresh is still queued or running is not queued again, new jobs are left to their spec
handler until admitted, and the loop never competes with the handlers' threads.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger("finetune_operator.resync")
Key = tuple[str, str]


class Resync:
    def __init__(self, interval: float, due: Callable[[], Iterable[Key]],
                 refresh: Callable[[str, str], None], workers: int = 4) -> None:
        self.interval = interval
        self.due = due
        self.refresh = refresh
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resync")
        self._pending: set[Key] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._context: contextvars.Context | None = None

    def start(self, context: contextvars.Context) -> None:
        """`context`: a handler's, so that kopf's event posting works from these threads."""
        self._context = context
        self._thread = threading.Thread(target=self._run, name="resync", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
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
            context = self._context.copy() if self._context is not None else contextvars.copy_context()
            context.run(self.refresh, *key)
        except Exception as e:  # noqa: BLE001 - the next pass tries again
            log.warning("%s/%s: resync failed: %s", key[0], key[1], e)
        finally:
            with self._guard:
                self._pending.discard(key)
