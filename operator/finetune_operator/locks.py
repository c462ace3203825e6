"""One lock per object, so that the spec handler, the timer and watch events of one object never
interleave their read-modify-write of its status; a lock is dropped once nobody holds or waits
for it, so the table does not grow with every object the operator ever saw.

`coalesced` lets level-triggered work (a status refresh, which reads everything it needs after it
gets the lock) skip when another refresh of the same object is already waiting: that one runs
after the current holder and sees whatever the caller's event reported. A burst of pod and Job
events of one job then costs one refresh behind the running one, not one each.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager


class _Entry:
    __slots__ = ("lock", "users", "refreshes_waiting")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0  # holding or waiting
        self.refreshes_waiting = 0  # coalesced callers waiting for the lock


class KeyedLocks:
    """`waiting`, when given, is a gauge of holders waiting for a key someone else holds."""

    def __init__(self, waiting=None) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, _Entry] = {}
        self._waiting = waiting

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(key, _Entry())
            entry.users += 1
        try:
            self._acquire(entry)
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            self._leave(key, entry)

    @contextmanager
    def coalesced(self, key: Hashable) -> Iterator[bool]:
        """Yields True holding the key's lock, or False at once (holding nothing) when another
        coalesced caller already waits for it."""
        with self._guard:
            entry = self._locks.setdefault(key, _Entry())
            if entry.refreshes_waiting:
                skip = True
            else:
                skip = False
                entry.users += 1
                entry.refreshes_waiting += 1
        if skip:
            yield False
            return
        try:
            try:
                self._acquire(entry)
            finally:
                with self._guard:
                    entry.refreshes_waiting -= 1
            try:
                yield True
            finally:
                entry.lock.release()
        finally:
            self._leave(key, entry)

    def _acquire(self, entry: _Entry) -> None:
        if not entry.lock.acquire(blocking=False):
            self._count(+1)
            try:
                entry.lock.acquire()
            finally:
                self._count(-1)

    def _leave(self, key: Hashable, entry: _Entry) -> None:
        with self._guard:
            entry.users -= 1
            if entry.users == 0 and self._locks.get(key) is entry:
                del self._locks[key]

    def _count(self, delta: int) -> None:
        if self._waiting is not None:
            self._waiting.inc(delta)

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)
