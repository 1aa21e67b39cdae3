"""The one seam where messages cross between the coordinator and the sites.

The coordinator only ever calls :meth:`Transport.exchange`: it hands over one message (bytes) per
site and gets back the replies of the sites that answered; a site that does not answer has dropped
out of that step. The embedded runtime delivers in this process (:class:`InProcessTransport`) or
to sites in worker processes (:mod:`securefed.federation.workers`); a networked runtime implements
the same two methods. :class:`RecordingTransport` keeps the coordinator's transcript and
:class:`FaultInjectingTransport` makes sites vanish on cue, for tests and dropout studies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "Transport",
    "SiteEndpoint",
    "InProcessTransport",
    "RecordingTransport",
    "FaultInjectingTransport",
    "Transcript",
    "TranscriptEntry",
]


class SiteEndpoint(Protocol):
    """A site as the transport sees it: bytes in, bytes (or silence) out."""

    def handle(self, data: bytes) -> bytes | None: ...


class Transport(Protocol):
    def exchange(self, outgoing: Mapping[str, bytes]) -> dict[str, bytes]:
        """Deliver ``outgoing[name]`` to each site; return the replies of the sites that answered."""
        ...

    def close(self) -> None: ...


class InProcessTransport:
    """Every site in this process; ``workers`` threads serve sites concurrently."""

    def __init__(self, endpoints: Mapping[str, SiteEndpoint], *, workers: int = 1) -> None:
        self._endpoints = dict(endpoints)
        self._pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None

    def exchange(self, outgoing: Mapping[str, bytes]) -> dict[str, bytes]:
        unknown = sorted(set(outgoing) - set(self._endpoints))
        if unknown:
            raise KeyError(f"no site named {unknown[0]!r} on this transport")
        names = list(outgoing)

        def deliver(name: str) -> bytes | None:
            return self._endpoints[name].handle(bytes(outgoing[name]))

        replies = list(self._pool.map(deliver, names)) if self._pool else [deliver(n) for n in names]
        return {name: reply for name, reply in zip(names, replies) if reply is not None}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


@dataclass(frozen=True)
class TranscriptEntry:
    """One message the coordinator sent or received."""

    exchange: int
    direction: str  # "sent" | "received"
    site: str
    kind: str  # the message kind, read from its header
    nbytes: int
    data: bytes | None  # kept only when the transcript keeps payloads


@dataclass
class Transcript:
    entries: list[TranscriptEntry] = field(default_factory=list)

    def received(self) -> list[TranscriptEntry]:
        return [e for e in self.entries if e.direction == "received"]

    @property
    def bytes_received(self) -> int:
        return sum(e.nbytes for e in self.entries if e.direction == "received")

    @property
    def bytes_sent(self) -> int:
        return sum(e.nbytes for e in self.entries if e.direction == "sent")


class RecordingTransport:
    """Wraps a transport and records everything the coordinator sends and receives."""

    def __init__(self, inner: Transport, *, keep_payloads: bool = False,
                 classify: Callable[[bytes], str] = lambda data: "message") -> None:
        self.inner = inner
        self.classify = classify
        self.keep = keep_payloads
        self.transcript = Transcript()
        self._exchanges = 0

    def exchange(self, outgoing: Mapping[str, bytes]) -> dict[str, bytes]:
        self._exchanges += 1
        for site, data in outgoing.items():
            self.transcript.entries.append(
                TranscriptEntry(self._exchanges, "sent", site, self.classify(data), len(data),
                               bytes(data) if self.keep else None))
        replies = self.inner.exchange(outgoing)
        for site, data in replies.items():
            self.transcript.entries.append(
                TranscriptEntry(self._exchanges, "received", site, self.classify(data), len(data),
                               bytes(data) if self.keep else None))
        return replies

    def close(self) -> None:
        self.inner.close()


class FaultInjectingTransport:
    """Drops a site's reply whenever ``drop(exchange_number, site, outgoing_bytes)`` says so.

    A dropped site still received and processed the message (it vanished on the way back), which
    is the harder case for the protocol: its state moved on while the coordinator heard nothing.
    """

    def __init__(self, inner: Transport, drop: Callable[[int, str, bytes], bool]) -> None:
        self.inner = inner
        self.drop = drop
        self._exchanges = 0

    def exchange(self, outgoing: Mapping[str, bytes]) -> dict[str, bytes]:
        self._exchanges += 1
        replies = self.inner.exchange(outgoing)
        return {s: d for s, d in replies.items() if not self.drop(self._exchanges, s, outgoing[s])}

    def close(self) -> None:
        self.inner.close()
