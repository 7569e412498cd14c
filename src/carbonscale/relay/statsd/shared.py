"""The state the supervisor and the workers share: one int64 array in shared memory."""

from __future__ import annotations

import ctypes
import multiprocessing
from collections.abc import Sequence

# Counters each worker publishes (cumulative), in this order, followed by the
# per-backend forwarded counts.
COUNTERS = (
    "datagrams_received",
    "metrics_received",
    "metrics_forwarded",
    "metrics_malformed",
    "metrics_rerouted",
    "metrics_no_backend",
    "metrics_send_failed",
    # Lines statsd would turn into a number carbon cannot store (a value that
    # is not finite, a sample rate of 0): dropped here, counted.
    "metrics_refused",
)

(
    C_DATAGRAMS,
    C_METRICS,
    C_FORWARDED,
    C_MALFORMED,
    C_REROUTED,
    C_NO_BACKEND,
    C_SEND_FAILED,
    C_REFUSED,
) = range(len(COUNTERS))


class SharedState:
    """One int64 array in shared memory.

    [0] health generation (bumped on every change of the usable set),
    [1 .. n] usable flags, then one block per worker: the COUNTERS followed by
    forwarded metrics per backend. Workers write only their own block.
    """

    def __init__(self, backends: int, workers: int, array=None) -> None:
        self.backends = backends
        self.workers = workers
        self.block = len(COUNTERS) + backends
        size = 1 + backends + workers * self.block
        self.array = array if array is not None else multiprocessing.RawArray(ctypes.c_int64, size)
        if array is None:
            for i in range(backends):
                self.array[1 + i] = 1

    def generation(self) -> int:
        return self.array[0]

    def usable(self) -> list[bool]:
        return [bool(v) for v in self.array[1 : 1 + self.backends]]

    def set_usable(self, usable: Sequence[bool]) -> None:
        for i, flag in enumerate(usable):
            self.array[1 + i] = int(flag)
        self.array[0] += 1

    def worker_offset(self, worker: int) -> int:
        return 1 + self.backends + worker * self.block

    def totals(self) -> list[int]:
        """COUNTERS then per-backend forwarded, summed over workers."""
        sums = [0] * self.block
        for w in range(self.workers):
            base = self.worker_offset(w)
            for i in range(self.block):
                sums[i] += self.array[base + i]
        return sums
