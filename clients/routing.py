"""Least-loaded choice among several service addresses. Plain Python: the client feeds it loads and counts.

Prefill: the fewest requests this client has in flight there. Decode: the lowest load reported by GetLoad just
before the choice ((active + queued) / max_batch), then this client's own in-flight count. An address whose
last call failed ranks after the others; ties go round-robin, so equal backends share the work.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(slots=True)
class Backend:
    address: str
    in_flight: int = 0
    reported: float | None = None  # decode: (active + queued) / max_batch at the last GetLoad; None = unknown
    max_batch: int = 1
    failures: int = 0  # consecutive failed calls; reset by a success


class Pool:
    """The addresses of one service kind and their load as this client sees it."""

    def __init__(self, addresses: str | list[str] | tuple[str, ...], kind: str):
        addrs = [addresses] if isinstance(addresses, str) else list(addresses)
        if not addrs or any(not a for a in addrs):
            raise ValueError(f"{kind}: give at least one address HOST:PORT")
        self.kind = kind
        self.backends = [Backend(a) for a in dict.fromkeys(addrs)]
        self._turn = itertools.count()

    def __len__(self) -> int:
        return len(self.backends)

    def report(self, backend: Backend, active: int, queued: int, max_batch: int) -> None:
        backend.max_batch = max(1, max_batch)
        backend.reported = (active + queued) / backend.max_batch

    def ranked(self) -> list[Backend]:
        """All backends, best first: healthy before failing, then by load, ties in rotating order."""
        turn = next(self._turn)
        n = len(self.backends)

        def key(ib: tuple[int, Backend]) -> tuple[int, float, int, int]:
            i, b = ib
            reported = b.reported if b.reported is not None else float("inf")
            return (min(b.failures, 1), reported, b.in_flight, (i - turn) % n)

        return [b for _, b in sorted(enumerate(self.backends), key=key)]

    @staticmethod
    def started(backend: Backend) -> None:
        backend.in_flight += 1

    @staticmethod
    def finished(backend: Backend, ok: bool) -> None:
        backend.in_flight -= 1
        backend.failures = 0 if ok else backend.failures + 1
