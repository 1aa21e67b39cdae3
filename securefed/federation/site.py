"""One hospital in the federation: bytes in, bytes out, its data and keys never leave.

A :class:`FederationSite` answers the coordinator's messages (:mod:`securefed.federation.messages`).
On :class:`RoundStart` it evaluates the model it was sent on its held-out split, trains a round of
local (DP-)SGD from it, and joins secure aggregation with the update; it then answers the protocol
messages with its :class:`~securefed.secagg.SecAggClient`. It refuses, rather than obeys:

- a round whose aggregation is weaker than the federation agreed (a "plain" request under secure
  aggregation would reveal its update in the clear);
- a protocol round id not above the last one it started (replay protection, persisted first);
- a second run of a training round from a *different* model: a replay after a crash reuses the
  round's ledger charge and reproduces the same noise, which is only harmless from the same model;
- under site-level distributed DP, a replay of a round whose noised update already left the
  site: two sums over different survivors with the same noise would reveal their difference,
  which carries too little noise on its own. The site sits that round out (its charge stands).

With site-level DP (``site_dp``), the site charges its ledger for the worst case the protocol
allows (only ``threshold`` sites' noise in the sum) before encoding, and settles the charge with
the signed survivor list once it knows who is in the sum.

Everything it must remember is in its :class:`~securefed.federation.workspace.SiteWorkspace`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from securefed.errors import PrivacyBudgetExceeded, ProtocolAbort, ProtocolError, SecurefedError
from securefed.federation.messages import (
    Acknowledgement,
    ModelRelease,
    PlainUpdate,
    ProtocolRelay,
    RoundStart,
    SiteRefusal,
    decode_federation_message,
    model_digest,
)
from securefed.federation.site_level import SITE_DP_NOTE, SiteLevelDP, rotation_seed
from securefed.federation.workspace import SiteWorkspace
from securefed.primitives.keys import Roster, SiteIdentity
from securefed.primitives.randomness import RandomSource, SeededRandom
from securefed.secagg.client import SecAggClient
from securefed.secagg.config import SecAggConfig
from securefed.secagg.config import RoundConfig
from securefed.secagg.messages import ConsistencySignature, MaskedInput, decode_message
from securefed.secagg.modular import ModularInput

__all__ = ["FederationSite", "LocalLearner", "training_round_id"]


class LocalLearner(Protocol):
    """What a site needs from local training (see :mod:`securefed.federation.local_training`)."""

    def train_round(self, global_vector: np.ndarray, *, round_id: str, replay_charged: bool = False) -> Any: ...

    def evaluate(self, vector: np.ndarray, data: Any) -> dict[str, float]: ...


def training_round_id(round_: int) -> str:
    """The ledger's round id of federated round ``round_`` (1-based)."""
    return f"round-{round_}"


class FederationSite:
    def __init__(self, *, identity: SiteIdentity, roster: Roster, aggregation: str, policy: SecAggConfig,
                 workspace: SiteWorkspace, learner: Callable[[], LocalLearner], validation: Any,
                 rng: RandomSource, ledger: Any = None, site_dp: SiteLevelDP | None = None) -> None:
        """``learner`` is called once, on the first round (building it loads torch and the model).
        ``ledger`` (optional) is published after every round: its signed head and id go to the
        workspace. ``rng`` draws this site's protocol randomness (masks, keys, rounding)."""
        self.identity = identity
        self.name = identity.name
        self.roster = roster
        self.aggregation = aggregation
        self.policy = policy
        self.workspace = workspace
        self._make_learner = learner
        self._learner: LocalLearner | None = None
        self._validation = validation
        self._rng = rng
        self._ledger = ledger
        self._client: SecAggClient | None = None
        self._protocol_round: int | None = None
        self._round: int | None = None
        self._site_dp = site_dp
        self._site_charge: tuple[Any, Any] | None = None  # (ledger entry, encoder) awaiting its settle
        self.refusals: list[str] = []  # why this site refused or went silent (its own log)

    # ------------------------------------------------------------------ transport entry point
    def handle(self, data: bytes) -> bytes | None:
        try:
            message = decode_federation_message(data)
        except ProtocolError as exc:
            self.refusals.append(f"malformed message: {exc}")
            return None
        if isinstance(message, RoundStart):
            return self._start_round(message)
        if isinstance(message, ProtocolRelay):
            return self._relay(message)
        if isinstance(message, ModelRelease):
            self._evaluate(message.round, message.model)
            return Acknowledgement(message.round).encode()
        self.refusals.append(f"unexpected {type(message).__name__} from the coordinator")
        return None

    # ------------------------------------------------------------------ rounds
    def _refuse(self, round_: int, reason: str) -> bytes:
        self.refusals.append(f"round {round_}: {reason}")
        return SiteRefusal(round_, reason).encode()

    def _untrained(self, round_: int, trained_from: str | None, reason: str) -> bytes:
        """Refuse a round refused before any DP-SGD charge: it no longer counts as trained here."""
        if trained_from is None:
            state = self.workspace.load_state()
            state.trained.pop(round_, None)
            self.workspace.save_state(state)
        return self._refuse(round_, reason)

    def learner(self) -> LocalLearner:
        if self._learner is None:
            self._learner = self._make_learner()
        return self._learner

    def _start_round(self, start: RoundStart) -> bytes | None:
        self._client, self._site_charge, self._round = None, None, start.round
        if start.aggregation != self.aggregation:
            return self._refuse(start.round, f"the federation aggregates with {self.aggregation!r}; "
                                             f"a {start.aggregation!r} round is refused")
        setup = None
        if start.aggregation != "plain":
            try:
                setup = decode_message(start.setup)
            except ProtocolError as exc:
                return self._refuse(start.round, f"malformed protocol setup: {exc}")
            if setup.round_id != start.protocol_round:
                return self._refuse(start.round, "the protocol setup names another round")
        state = self.workspace.load_state()
        previous = state.previous_protocol_round
        if previous is not None and start.protocol_round <= previous:
            return self._refuse(start.round, f"protocol round {start.protocol_round} is not above the last one "
                                             f"started ({previous}); replayed or stale rounds are refused")
        if self._site_dp is not None and start.round in state.noised_sent:
            return self._refuse(start.round, "this round's noised update already left this site in an earlier "
                                             "attempt; sitting out its replay keeps two sums from sharing that noise")
        digest = model_digest(start.model).hex()
        trained_from = state.trained.get(start.round)
        if trained_from is not None and trained_from != digest:
            return self._refuse(start.round, "this round was already trained from a different model; "
                                             "repeating it would reuse its noise on other data")
        state.previous_protocol_round = start.protocol_round
        state.trained[start.round] = digest
        self.workspace.save_state(state)  # before anything leaves this site
        self._evaluate(start.round - 1, start.model)
        if self._site_dp is not None:  # charged first: a refusal here leaves DP-SGD's budget untouched
            try:
                self._charge_site_level(start.round, setup.config, start.model.size)
            except PrivacyBudgetExceeded:
                return self._untrained(start.round, trained_from, "privacy budget exhausted")
            except SecurefedError as exc:
                return self._untrained(start.round, trained_from, f"site-level DP refused the round: {exc}")
            finally:
                self._publish_ledger()
        try:
            result = self.learner().train_round(start.model, round_id=training_round_id(start.round),
                                                replay_charged=trained_from is not None)
        except PrivacyBudgetExceeded:
            return self._untrained(start.round, trained_from, "privacy budget exhausted")
        finally:
            self._publish_ledger()
        update = np.asarray(result.update, dtype=np.float32)
        if start.aggregation == "plain":
            return PlainUpdate(start.round, 1.0, update).encode()
        self._protocol_round = start.protocol_round
        vector: np.ndarray | ModularInput = update
        if self._site_charge is not None:
            _, encoder = self._site_charge
            vector = ModularInput(encoder.encode(update, round_seed=rotation_seed(setup.config.digest),
                                                 rng=self._fork(f"site-dp/{start.round}")))
        try:
            self._client = SecAggClient(identity=self.identity, roster=self.roster, vector=vector, weight=1.0,
                                        rng=self._fork(f"secagg/{start.protocol_round}"),
                                        previous_round=previous, policy=self.policy)
            reply = self._client.handle(setup)
        except ProtocolError as exc:
            self._client = None
            return self._refuse(start.round, f"secure aggregation refused: {exc}")
        return ProtocolRelay(start.protocol_round, reply.encode()).encode()

    def _relay(self, relay: ProtocolRelay) -> bytes | None:
        if self._client is None or relay.protocol_round != self._protocol_round:
            self.refusals.append(f"protocol message for round {relay.protocol_round} outside a round")
            return None
        try:
            reply = self._client.handle(decode_message(relay.payload))
        except ProtocolError as exc:  # an honest site refusing a misbehaving coordinator: silence
            self.refusals.append(f"protocol round {relay.protocol_round}: {exc}")
            self._client = None
            return None
        if self._site_charge is not None and isinstance(reply, MaskedInput):
            state = self.workspace.load_state()
            state.noised_sent.add(self._round)  # type: ignore[arg-type]
            self.workspace.save_state(state)  # before the noised update leaves
        if self._site_charge is not None and isinstance(reply, ConsistencySignature):
            self._settle()
        return ProtocolRelay(relay.protocol_round, reply.encode()).encode()

    # ------------------------------------------------------------------ site-level DP
    def _charge_site_level(self, round_: int, config: RoundConfig, dimension: int) -> None:
        """Charge the worst case the protocol allows before the update exists (a replay whose
        noised update never left this site reuses the earlier attempt's charge)."""
        from securefed.privacy.events import DistributedDiscreteGaussian
        from securefed.privacy.ledger_records import EntryKind

        assert self._site_dp is not None and self._ledger is not None
        encoder = self._site_dp.encoder(dimension=dimension, cohort=config.n_sites, threshold=config.threshold)
        if config.vector_length != encoder.padded_dimension:
            raise ProtocolAbort(f"the round sums {config.vector_length} values; site-level DP sends "
                                f"{encoder.padded_dimension}")
        key = training_round_id(round_)
        worst = encoder.event(sites=config.threshold)
        earlier = [e for e in self._ledger.entries() if e.kind is EntryKind.CHARGE and e.round_id == key
                   and isinstance(e.event, DistributedDiscreteGaussian)]
        if earlier and earlier[0].event != worst:
            raise ProtocolAbort("this round was charged for another site-level mechanism in an earlier attempt")
        charge = earlier[0] if earlier else self._ledger.charge(
            worst, round_id=key, note=f"{SITE_DP_NOTE}, worst case: {config.threshold} sites' noise")
        self._site_charge = (charge, encoder)

    def _settle(self) -> None:
        """Lower the worst-case charge to the noise of the sites the signed survivor list names."""
        charge, encoder = self._site_charge  # type: ignore[misc]
        self._site_charge = None
        survivors = self._client.survivors if self._client is not None else None
        if not survivors:
            return
        actual = encoder.event(sites=len(survivors))
        if actual == charge.event:
            return
        try:
            self._ledger.settle(charge.seq, actual, note=f"{SITE_DP_NOTE}: {len(survivors)} sites' noise in the sum")
        except SecurefedError as exc:  # the worst-case charge stands: over-counting is safe
            self.refusals.append(f"round {self._round}: could not settle the site-level charge: {exc}")
        self._publish_ledger()

    # ------------------------------------------------------------------ local bookkeeping
    def _fork(self, label: str) -> RandomSource:
        return self._rng.fork(label) if isinstance(self._rng, SeededRandom) else self._rng

    def _evaluate(self, round_: int, model: np.ndarray) -> None:
        if self._validation is None or len(self._validation) == 0:
            return
        if any(r.get("round") == round_ for r in self.workspace.metrics()):
            return
        try:
            metrics = self.learner().evaluate(model, self._validation)
        except SecurefedError as exc:
            self.refusals.append(f"evaluation of round {round_} failed: {exc}")
            return
        self.workspace.record_metrics(round_, metrics)

    def _publish_ledger(self) -> None:
        if self._ledger is not None:
            self.workspace.publish_head(self._ledger.head().to_dict(), self._ledger.ledger_id)

    def close(self) -> None:
        """Close the ledger (the workspace stays as it is)."""
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
