"""Slow and idle clients cannot hold the server's sockets: uvicorn's h11 protocol with a head
timeout, an idle/minimum-rate timeout on request bodies, and a connection cap, and the one place
that builds the uvicorn config (`uvicorn_config`, used by `geosurge serve` and `ServerThread`).

uvicorn itself has a keep-alive timeout between requests but none while it waits for a request:
a connection that sends nothing, or one byte a second, stays open forever. Here each connection
has one timer that checks, about once a second, the phase h11 says the client is in:

- waiting for (or part-way through) a request head: closed (408) after `header_timeout_s`;
- sending a body: closed after `idle_timeout_s` without a byte, or when after `idle_timeout_s`
  it has averaged under `min_upload_rate` bytes/s (a 1-byte/s trickle);
- anything else (the app is working, the answer is being sent): left alone.

Beyond `max_connections` open connections a new one gets 503 and is closed at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from geosurge_index.settings import ServiceSettings

log = logging.getLogger("geosurge.server")



def _raw_answer(status: str, body: bytes, extra: str = "") -> bytes:
    """A whole HTTP/1.1 answer, written straight to the socket before it is closed."""
    head = (f"HTTP/1.1 {status}\r\n{extra}Connection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


REFUSED = _raw_answer("503 Service Unavailable", b'{"detail": "too many open connections", "kind": "overloaded"}',
                      "Retry-After: 1\r\n")
TIMED_OUT = _raw_answer("408 Request Timeout", b'{"detail": "request not sent in time", "kind": "timeout"}')


@dataclass
class GuardStats:
    """What the guard did (in `/v1/stats`)."""

    open: int = 0
    refused: int = 0  # over max_connections
    head_timeouts: int = 0
    body_timeouts: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class GuardLimits:
    header_timeout_s: float
    idle_timeout_s: float
    min_upload_rate: float  # bytes/s
    max_connections: int

    @classmethod
    def of(cls, settings: ServiceSettings) -> GuardLimits:
        return cls(settings.header_timeout_s, settings.idle_timeout_s, settings.min_upload_rate,
                   settings.max_connections)

    @property
    def tick(self) -> float:
        return max(0.05, min(1.0, self.header_timeout_s / 4, self.idle_timeout_s / 4))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the checks above; `guarded_protocol` binds the limits."""

    limits: GuardLimits
    stats: GuardStats

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer = None
        if len(self.connections) > self.limits.max_connections:
            self.stats.refused += 1
            transport.write(REFUSED)
            transport.close()
            return
        self.stats.open = len(self.connections)
        now = self.loop.time()
        self._phase, self._phase_since, self._phase_bytes, self._last_data = h11.IDLE, now, 0, now
        self._timer = self.loop.call_later(self.limits.tick, self._check)

    def connection_lost(self, exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)
        self.stats.open = len(self.connections)

    def data_received(self, data: bytes) -> None:
        self._phase_bytes += len(data)
        self._last_data = self.loop.time()
        super().data_received(data)

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now, limits = self.loop.time(), self.limits
        state = self.conn.their_state
        if state is not self._phase:  # a new phase: its clock starts now
            self._phase, self._phase_since, self._phase_bytes, self._last_data = state, now, 0, now
        if self.flow.read_paused:  # the app is not reading yet: the client is not to blame
            self._last_data = now
        elapsed = now - self._phase_since
        if state is h11.IDLE:  # before a request, or between two on a kept-alive connection
            if elapsed > limits.header_timeout_s:
                return self._drop("head_timeouts", f"no complete request head after {elapsed:.0f} s")
        elif state is h11.SEND_BODY and not self.flow.read_paused:
            if now - self._last_data > limits.idle_timeout_s:
                return self._drop("body_timeouts", f"no body byte for {now - self._last_data:.0f} s")
            if elapsed > limits.idle_timeout_s and self._phase_bytes < limits.min_upload_rate * elapsed:
                return self._drop("body_timeouts", f"body at {self._phase_bytes / elapsed:.0f} B/s, under "
                                  f"the minimum of {limits.min_upload_rate:.0f}")
        self._timer = self.loop.call_later(limits.tick, self._check)

    def _drop(self, counter: str, why: str) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.debug("closing the connection of %s: %s", client, why)
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(TIMED_OUT)  # nothing else is being answered on it
        self.transport.close()


def guarded_protocol(limits: GuardLimits, stats: GuardStats) -> type[GuardedH11Protocol]:
    """A protocol class bound to `limits` (uvicorn instantiates the class per connection)."""
    return type("GuardedH11", (GuardedH11Protocol,), {"limits": limits, "stats": stats})


def uvicorn_config(app, settings: ServiceSettings, *, host: str | None = None, port: int | None = None,
                   log_level: str | None = None, access_log: bool = True):
    """The uvicorn config of the service: the guard, keep-alive, the graceful-shutdown time."""
    import uvicorn

    state = getattr(app.state, "service", None)
    stats = state.connections if state is not None else GuardStats()
    return uvicorn.Config(
        app, host=host or settings.host, port=port or settings.port,
        log_level=log_level or settings.log_level, access_log=access_log, lifespan="on",
        http=guarded_protocol(GuardLimits.of(settings), stats),
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=30,
    )
