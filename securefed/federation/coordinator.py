"""The coordinator: runs rounds over a transport, learns only the combined update.

It holds the roster (public keys), the agreed secure-aggregation policy and a
:class:`~securefed.federation.transport.Transport`: no reference to any site object, no site
data, no site keys. Under secure aggregation it drives a
:class:`~securefed.secagg.SecAggServer` through the transport and ends each round with the
survivors' mean update; sites that drop, refuse or send what does not parse are left out and
reported. ``"plain"`` aggregation (the non-private baseline) receives updates in the clear.
With site-level distributed DP the sites send noised ring elements; the coordinator decodes the
modular sum into the noisy sum of clipped updates (the same public encoder every site builds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from securefed.errors import ConfigError, ProtocolAbort, ProtocolError
from securefed.federation.messages import (
    ModelRelease,
    PlainUpdate,
    ProtocolRelay,
    RoundStart,
    SiteRefusal,
    decode_federation_message,
)
from securefed.federation.site_level import SiteLevelDP, rotation_seed
from securefed.federation.transport import Transport
from securefed.primitives.keys import Roster
from securefed.secagg.config import SecAggConfig
from securefed.secagg.messages import decode_message
from securefed.secagg.server import AggregateResult, SecAggServer

__all__ = ["Coordinator", "RoundOutcome"]


@dataclass(frozen=True, eq=False)
class RoundOutcome:
    """What one round produced, as the coordinator saw it."""

    round: int
    cohort: tuple[str, ...]
    survivors: tuple[str, ...]  # sites whose updates are in the mean
    mean_update: np.ndarray | None  # None when the round failed
    refusals: dict[str, str] = field(default_factory=dict)  # site -> its stated reason
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why the coordinator dropped its message
    failure: str | None = None  # why the round produced no update
    encrypted: Any = None  # under "he": the EncryptedAggregate the sites decrypt (the mean is theirs)


class Coordinator:
    def __init__(self, *, roster: Roster, transport: Transport, aggregation: str, policy: SecAggConfig,
                 site_dp: SiteLevelDP | None = None) -> None:
        if aggregation not in ("secagg", "plain", "he"):  # "he" rounds are run by HECoordinator
            raise ConfigError(f"aggregation {aggregation!r} is not available here; use 'secagg', 'plain' or 'he'")
        self.roster = roster
        self.transport = transport
        self.aggregation = aggregation
        self.policy = policy
        self.site_dp = site_dp

    def run_round(self, *, round_: int, protocol_round: int, cohort: Sequence[str], model: np.ndarray,
                  graph_seed: bytes) -> RoundOutcome:
        """One round: every site in ``cohort`` trains from ``model``; return the survivors' mean update."""
        unknown = [s for s in cohort if s not in self.roster]
        if unknown:
            raise ConfigError(f"sites {unknown} are not in the federation roster")
        model = np.ascontiguousarray(model, dtype=np.float32)
        if self.aggregation == "plain":
            return self._plain_round(round_, protocol_round, tuple(cohort), model)
        return self._secure_round(round_, protocol_round, tuple(cohort), model, graph_seed)

    def release(self, *, round_: int, model: np.ndarray, sites: Sequence[str]) -> set[str]:
        """Send the global model after ``round_`` to ``sites``; return those that acknowledged."""
        message = ModelRelease(round_, np.ascontiguousarray(model, dtype=np.float32)).encode()
        return set(self.transport.exchange({s: message for s in sites}))

    # ------------------------------------------------------------------ plain baseline
    def _plain_round(self, round_: int, protocol_round: int, cohort: tuple[str, ...], model: np.ndarray) -> RoundOutcome:
        start = RoundStart(round_, protocol_round, "plain", model, b"").encode()
        replies = self.transport.exchange({s: start for s in cohort})
        total = np.zeros(model.size, dtype=np.float64)
        weight, survivors, refusals, rejected = 0.0, [], {}, {}
        for site in cohort:
            if site not in replies:
                continue
            try:
                message = decode_federation_message(replies[site])
            except ProtocolError as exc:
                rejected[site] = str(exc)
                continue
            if isinstance(message, SiteRefusal):
                refusals[site] = message.reason
            elif (isinstance(message, PlainUpdate) and message.round == round_ and message.update.size == model.size
                  and np.isfinite(message.update).all() and np.isfinite(message.weight) and message.weight > 0):
                total += message.weight * message.update.astype(np.float64)
                weight += message.weight
                survivors.append(site)
            else:
                rejected[site] = f"unexpected or invalid {type(message).__name__}"
        if not survivors:
            return RoundOutcome(round_, cohort, (), None, refusals, rejected, "no site sent an update")
        return RoundOutcome(round_, cohort, tuple(survivors), (total / weight).astype(np.float32), refusals, rejected)

    # ------------------------------------------------------------------ secure aggregation
    def _secure_round(self, round_: int, protocol_round: int, cohort: tuple[str, ...], model: np.ndarray,
                      graph_seed: bytes) -> RoundOutcome:
        names = self.roster.names
        indices = tuple(sorted(self.roster.index(s) for s in cohort))
        encoder = None
        if self.site_dp is not None:
            _, threshold = self.policy.resolve(len(indices))
            encoder = self.site_dp.encoder(dimension=model.size, cohort=len(indices), threshold=threshold)
        length = model.size if encoder is None else encoder.padded_dimension
        config = self.policy.round_config(n_sites=len(indices), vector_length=length, round_id=protocol_round,
                                          roster_digest=self.roster.digest(), graph_seed=graph_seed,
                                          participants=indices)
        server = SecAggServer(config, self.roster)
        setups = server.begin()
        encoded: dict[bytes, bytes] = {}  # every site gets the same setup: encode the model once
        outgoing = {}
        for i, setup in setups.items():
            setup_bytes = setup.encode()
            if setup_bytes not in encoded:
                encoded[setup_bytes] = RoundStart(round_, protocol_round, "secagg", model, setup_bytes).encode()
            outgoing[names[i]] = encoded[setup_bytes]
        refusals: dict[str, str] = {}
        rejected: dict[str, str] = {}
        while True:
            replies = self.transport.exchange(outgoing)
            for site, data in replies.items():
                self._receive(server, protocol_round, site, data, refusals, rejected)
            try:
                result = server.close_stage()
            except ProtocolAbort as exc:
                return RoundOutcome(round_, cohort, (), None, refusals, rejected, f"secure aggregation aborted: {exc}")
            if isinstance(result, AggregateResult):
                break
            outgoing = {names[i]: ProtocolRelay(protocol_round, m.encode()).encode() for i, m in result.items()}
        survivors = tuple(names[i] for i in sorted(result.survivors))
        if result.total_weight <= 0:
            return RoundOutcome(round_, cohort, survivors, None, refusals, rejected, "the survivors' weights sum to zero")
        if encoder is None:
            mean = (result.total / result.total_weight).astype(np.float32)
        else:  # weights are 1 each: the mean divides the noisy sum by the number of survivors
            total = encoder.decode(result.raw[:-1], round_seed=rotation_seed(config.digest))
            mean = (total / len(survivors)).astype(np.float32)
        return RoundOutcome(round_, cohort, survivors, mean, refusals, rejected)

    def _receive(self, server: SecAggServer, protocol_round: int, site: str, data: bytes,
                 refusals: dict[str, str], rejected: dict[str, str]) -> None:
        try:
            message = decode_federation_message(data)
            if isinstance(message, SiteRefusal):
                refusals[site] = message.reason
                return
            if not isinstance(message, ProtocolRelay) or message.protocol_round != protocol_round:
                raise ProtocolError(f"expected a protocol message of round {protocol_round}, got {type(message).__name__}")
            inner = decode_message(message.payload)
            if getattr(inner, "sender", None) != self.roster.index(site):
                raise ProtocolError("the message's sender is not the site that sent it")
            server.receive(inner)
        except ProtocolError as exc:  # a coordinator drops what it cannot use and goes on
            rejected[site] = str(exc)
