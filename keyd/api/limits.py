"""Per-client rate limits: a token bucket per caller, so one flooding client
gets 429 while every other client keeps its full rate.

With several workers the buckets live in :class:`SharedBuckets`, one small
table in shared memory that every worker of the daemon maps, so a client's
allowance is one allowance whichever worker its connection lands on.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from keyd.errors import RateLimited

# One bucket: the caller's 64-bit name hash (0: free slot), tokens, updated
# (time.monotonic(): CLOCK_MONOTONIC, the same clock in every process of a host).
_RECORD = struct.Struct("<Qdd")


class SharedBuckets:
    """A fixed open-addressed table of buckets in a memfd, mapped MAP_SHARED.

    Made by the parent before it forks its workers; each worker inherits the
    mapping and the descriptor.  The cross-process lock is a POSIX record lock
    on that descriptor: the kernel drops it when its holder dies, so a worker
    killed mid-update (SIGKILL) cannot wedge the others, as a semaphore would.
    """

    def __init__(self, slots: int = 4096) -> None:
        self.slots = slots
        self._fd = os.memfd_create("keyd-rate-limits", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, slots * _RECORD.size)
        self._map = mmap.mmap(self._fd, slots * _RECORD.size)
        self._index: dict[str, int | None] = {}  # caller -> slot, per process

    @contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def slot(self, caller: str) -> int | None:
        """The caller's slot (claimed on first use), or None when the table is full.

        Call under locked(): a claim is a read then a write.
        """
        if caller in self._index and self._index[caller] is not None:
            return self._index[caller]
        key = int.from_bytes(hashlib.blake2b(caller.encode(), digest_size=8).digest(),
                             "little") | 1
        start = key % self.slots
        for i in range(self.slots):
            at = (start + i) % self.slots
            found = _RECORD.unpack_from(self._map, at * _RECORD.size)[0]
            if found == key:
                self._index[caller] = at
                return at
            if found == 0:
                _RECORD.pack_into(self._map, at * _RECORD.size, key, math.nan, 0.0)
                self._index[caller] = at
                return at
        return None

    def read(self, at: int) -> tuple[float, float] | None:
        _, tokens, updated = _RECORD.unpack_from(self._map, at * _RECORD.size)
        return None if math.isnan(tokens) else (tokens, updated)

    def write(self, at: int, tokens: float, updated: float) -> None:
        key = _RECORD.unpack_from(self._map, at * _RECORD.size)[0]
        _RECORD.pack_into(self._map, at * _RECORD.size, key, tokens, updated)


class RateLimiter:
    def __init__(self, rate: float, burst: int, shared: SharedBuckets | None = None) -> None:
        self.rate, self.burst = rate, max(burst, 1)
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, updated)
        self._lock = threading.Lock()
        self._shared = shared

    def take(self, caller: str) -> None:
        """Spend one request of ``caller``'s allowance, or raise RateLimited."""
        if self.rate <= 0:
            return
        with self._lock:  # the record lock is per process: threads queue here first
            if self._shared is None:
                self._spend(caller, self._buckets.get(caller), self._buckets.__setitem__)
                return
            shared = self._shared
            with shared.locked():
                at = shared.slot(caller)
                if at is None:  # more callers than slots: this worker's own bucket
                    self._spend(caller, self._buckets.get(caller), self._buckets.__setitem__)
                    return
                self._spend(caller, shared.read(at),
                            lambda _c, value: shared.write(at, *value))

    def _spend(self, caller: str, bucket: tuple[float, float] | None,
               save: Callable[[str, tuple[float, float]], None]) -> None:
        now = time.monotonic()
        tokens, updated = bucket if bucket is not None else (float(self.burst), now)
        tokens = min(float(self.burst), tokens + max(0.0, now - updated) * self.rate)
        if tokens < 1.0:
            save(caller, (tokens, now))
            wait = math.ceil((1.0 - tokens) / self.rate)
            raise RateLimited(
                f"client {caller!r} is over {self.rate:g} requests a second", retry_after=wait
            )
        save(caller, (tokens - 1.0, now))
