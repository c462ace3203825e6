"""One lock per object, so that the spec handler, the timer and watch events of one object never
interleave their read-modify-write of its status; a lock is dropped once nobody holds or waits
for it, so the table does not grow with every object the operator ever saw."""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import contextmanager


class KeyedLocks:
    """`waiting`, when given, is a gauge of holders waiting for a key someone else holds."""

    def __init__(self, waiting=None) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, tuple[threading.Lock, list[int]]] = {}
        self._waiting = waiting

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            if not lock.acquire(blocking=False):
                self._count(+1)
                try:
                    lock.acquire()
                finally:
                    self._count(-1)
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._guard:
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[key]

    def _count(self, delta: int) -> None:
        if self._waiting is not None:
            self._waiting.inc(delta)

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)
