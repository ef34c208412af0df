"""Least-loaded choice among several service addresses. Plain Python: callers feed it loads, counts and health.

Prefill: the fewest requests this process has in flight there (its queue depth as far as we add to it). Decode:
the lowest load reported by GetLoad ((active + queued) / max_batch), then our own in-flight count. An address
whose last call failed ranks after the others; ties go round-robin, so equal backends share the work.

A gateway also ejects backends: one that failed a health check or a call with UNAVAILABLE is `up = False` and
left out until a health check readmits it; and one with `max_in_flight` calls of ours running takes no more.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from qwenpd.errors import ResourceExhausted, Unavailable


@dataclass(slots=True)
class Backend:
    address: str
    in_flight: int = 0
    reported: float | None = None  # decode: (active + queued) / max_batch at the last GetLoad; None = unknown
    max_batch: int = 1
    failures: int = 0  # consecutive failed calls; reset by a success
    up: bool = True  # False: ejected (failed a health check or a call) until a health check passes
    max_in_flight: int = 0  # 0 = no bound on our concurrent calls here
    slow_checks: int = 0  # consecutive health checks that timed out


class BackendPool:
    """The addresses of one service kind and their load as this process sees it."""

    def __init__(self, addresses: str | list[str] | tuple[str, ...], kind: str, max_in_flight: int = 0):
        addrs = [addresses] if isinstance(addresses, str) else list(addresses)
        if not addrs or any(not a for a in addrs):
            raise ValueError(f"{kind}: give at least one address HOST:PORT")
        if max_in_flight < 0:
            raise ValueError(f"{kind}: max_in_flight must be >= 0, got {max_in_flight}")
        self.kind = kind
        self.backends = [Backend(a, max_in_flight=max_in_flight) for a in dict.fromkeys(addrs)]
        self._turn = itertools.count()

    def __len__(self) -> int:
        return len(self.backends)

    def report(self, backend: Backend, active: int, queued: int, max_batch: int) -> None:
        backend.max_batch = max(1, max_batch)
        backend.reported = (active + queued) / backend.max_batch

    def ranked(self) -> list[Backend]:
        """Backends that may take a call now, best first: healthy before failing, then by load, ties in rotating
        order. Unavailable when every backend is ejected; ResourceExhausted when the rest are at their bound."""
        turn = next(self._turn)
        n = len(self.backends)

        def key(ib: tuple[int, Backend]) -> tuple[int, float, int, int]:
            i, b = ib
            reported = b.reported if b.reported is not None else float("inf")
            return (min(b.failures, 1), reported, b.in_flight, (i - turn) % n)

        up = [(i, b) for i, b in enumerate(self.backends) if b.up]
        if not up:
            raise Unavailable(f"no {self.kind} instance is up", subject=self.kind, retry_after_s=1.0)
        free = [(i, b) for i, b in up if not b.max_in_flight or b.in_flight < b.max_in_flight]
        if not free:
            raise ResourceExhausted(f"every {self.kind} instance is at its in-flight bound", subject=self.kind,
                                    retry_after_s=1.0)
        return [b for _, b in sorted(free, key=key)]

    def up_count(self) -> int:
        return sum(b.up for b in self.backends)

    @staticmethod
    def started(backend: Backend) -> None:
        backend.in_flight += 1

    @staticmethod
    def finished(backend: Backend, ok: bool) -> None:
        backend.in_flight -= 1
        backend.failures = 0 if ok else backend.failures + 1

    @staticmethod
    def set_up(backend: Backend, up: bool) -> bool:
        """Eject (up=False) or readmit a backend; True if that changed its state."""
        changed = backend.up != up
        backend.up = up
        if up and changed:
            backend.failures = 0
        return changed
