"""Shared helpers for the secure-aggregation tests: a hand-driven round and plain-sum oracles.

Everything here is test scaffolding; none of it re-implements what is being tested. The
oracles compute expected results independently (plain numpy / exact rational sums).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from securefed.primitives.keys import Roster, SiteIdentity
from securefed.primitives.randomness import SeededRandom
from securefed.secagg.client import ClientState, SecAggClient
from securefed.secagg.config import RoundConfig, SecAggConfig
from securefed.secagg.messages import (
    ConsistencySignature,
    KeyAdvertisement,
    KeyDirectory,
    MaskedInput,
    RoundSetup,
    ShareBundle,
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
)
from securefed.secagg.server import AggregateResult, SecAggServer
from securefed.secagg.stages import Stage

STAGES = list(Stage)
STAGE_NAMES = [s.value for s in Stage]

SERVER_TYPES = (RoundSetup, KeyDirectory, ShareDelivery, SurvivorList, UnmaskRequest)
CLIENT_TYPES = (KeyAdvertisement, ShareBundle, MaskedInput, ConsistencySignature, UnmaskShares)

# The server message a client in each state waits for (documented protocol order).
EXPECTED_BY_STATE = {
    ClientState.NEW: RoundSetup,
    ClientState.ADVERTISED: KeyDirectory,
    ClientState.SHARED: ShareDelivery,
    ClientState.MASKED: SurvivorList,
    ClientState.CONFIRMED: UnmaskRequest,
}
# How many server messages a client must have handled to be in each state.
STEPS_TO_STATE = {
    ClientState.NEW: 0,
    ClientState.ADVERTISED: 1,
    ClientState.SHARED: 2,
    ClientState.MASKED: 3,
    ClientState.CONFIRMED: 4,
    ClientState.DONE: 5,
}


def stable_int(label: str) -> int:
    """A reproducible integer from a string (Python's own hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "little")


def wire(message):
    """Send a message across the 'network': encode, then decode a fresh copy."""
    return decode_message(message.encode())


def federation(n: int, seed: str) -> tuple[list[SiteIdentity], Roster]:
    rng = SeededRandom(seed).fork("identities")
    identities = [SiteIdentity.generate(f"site-{i}", rng=rng.fork(str(i))) for i in range(n)]
    return identities, Roster([i.public() for i in identities])


@dataclass
class ManualRound:
    """One honest round driven stage by stage by the test, keeping every message.

    Clients are created from deterministic random streams, so ``fresh_client(i)`` builds a
    client that behaves byte-for-byte like site i did, and ``client_in_state`` replays the
    recorded coordinator messages to put such a client into any state.
    """

    n: int = 3
    length: int = 5
    seed: str = "manual-round"
    config: SecAggConfig = field(default_factory=SecAggConfig)
    round_id: int = 7
    vectors: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.vectors is None:
            self.vectors = np.random.default_rng(stable_int(self.seed)).uniform(-1, 1, (self.n, self.length))
        self.identities, self.roster = federation(self.n, self.seed)
        self.round_config: RoundConfig = self.config.round_config(
            n_sites=self.n,
            vector_length=self.length,
            round_id=self.round_id,
            roster_digest=self.roster.digest(),
            graph_seed=SeededRandom(self.seed).fork("graph").random_bytes(32),
        )
        self.server = SecAggServer(self.round_config, self.roster)
        self.clients = {i: self.fresh_client(i) for i in range(self.n)}
        # stage -> site -> message; "to" = coordinator to client, "from" = client to coordinator
        self.to_clients: dict[Stage, dict[int, object]] = {}
        self.from_clients: dict[Stage, dict[int, object]] = {}
        self.result: AggregateResult | None = None
        self._outgoing: dict[int, object] | None = None

    def client_rng(self, site: int) -> SeededRandom:
        return SeededRandom(self.seed).fork(f"client-{site}-{self.round_id}")

    def fresh_client(self, site: int, **kwargs) -> SecAggClient:
        kwargs.setdefault("previous_round", None)
        return SecAggClient(
            identity=self.identities[site], roster=self.roster, vector=self.vectors[site],
            rng=self.client_rng(site), **kwargs,
        )

    def begin(self) -> None:
        self._outgoing = dict(self.server.begin())

    def collect(self) -> dict[int, object]:
        """Every live client answers the current stage's coordinator message; nothing is sent on."""
        assert self._outgoing is not None, "call begin() first"
        stage = self.server.stage
        self.to_clients[stage] = {s: wire(m) for s, m in self._outgoing.items()}
        replies = {s: wire(self.clients[s].handle(m)) for s, m in self.to_clients[stage].items()}
        self.from_clients[stage] = replies
        return replies

    def close(self):
        out = self.server.close_stage()
        if isinstance(out, AggregateResult):
            self.result = out
            self._outgoing = None
        else:
            self._outgoing = out
        return out

    def step(self) -> None:
        """One whole stage: clients answer, the server receives every answer and closes."""
        for message in self.collect().values():
            self.server.receive(message)
        self.close()

    def run(self) -> AggregateResult:
        if self._outgoing is None and self.result is None:
            self.begin()
        while self.result is None:
            self.step()
        return self.result

    def client_in_state(self, site: int, state: ClientState, **kwargs) -> SecAggClient:
        """A fresh client for ``site`` that has handled the recorded messages up to ``state``."""
        client = self.fresh_client(site, **kwargs)
        for stage in STAGES[: STEPS_TO_STATE[state]]:
            client.handle(self.to_clients[stage][site])
        assert client.state is state
        return client

    def server_message(self, cls: type, site: int = 0):
        for stage, by_site in self.to_clients.items():
            message = by_site.get(site)
            if isinstance(message, cls):
                return message
        raise LookupError(cls.__name__)

    def client_message(self, cls: type, site: int = 0):
        for stage, by_site in self.from_clients.items():
            message = by_site.get(site)
            if isinstance(message, cls):
                return message
        raise LookupError(cls.__name__)


def exact_sum(rows) -> list[Fraction]:
    """The exact rational column sums of float rows (no rounding at all)."""
    rows = [np.asarray(r, dtype=np.float64) for r in rows]
    if not rows:
        return []
    return [sum((Fraction(float(r[j])) for r in rows), Fraction(0)) for j in range(rows[0].size)]


def max_exact_error(total: np.ndarray, rows) -> Fraction:
    """max_j |total_j - sum_i rows_ij| computed exactly."""
    expected = exact_sum(rows)
    return max(abs(Fraction(float(t)) - e) for t, e in zip(total, expected))


def contains_window(haystack: bytes, needle: bytes, window: int) -> bool:
    """True if any ``window``-byte slice of ``needle`` occurs in ``haystack``."""
    if len(needle) <= window:
        return needle in haystack
    return any(needle[i : i + window] in haystack for i in range(0, len(needle) - window + 1))
