"""One hospital in the federation: bytes in, bytes out, its data and keys never leave.

A :class:`FederationSite` answers the coordinator's messages (:mod:`securefed.federation.messages`).
On :class:`RoundStart` it evaluates the model it was sent on its held-out split, trains a round of
local (DP-)SGD from it, and joins secure aggregation with the update; it then answers the protocol
messages with its :class:`~securefed.secagg.SecAggClient`. It refuses, rather than obeys:

- a round whose aggregation is weaker than the federation agreed (a "plain" request under secure
  aggregation would reveal its update in the clear), or whose protocol configuration its
  secure-aggregation client would refuse (checked before anything is charged or trained);
- a protocol round id not above the last one it started (replay protection, persisted first);
- a second attempt at a training round whose update already left the site (marked on disk just
  before it leaves): two sums over different sets of sites holding the same update would reveal
  their difference. A replay after a crash therefore happens only when nothing of the round left
  the site; it then reuses the round's ledger charges (nothing was released under them) and must
  start from the same model.

With site-level DP (``site_dp``), the site charges its ledger for the worst case the protocol
allows (only ``threshold`` sites' noise in the sum) before training, and lowers the charge to the
survivors actually summed once their list is certified by the unmask stage (complete graph only;
on a sparse graph it cannot check every survivor, so the worst case stands).

Under homomorphic encryption (``he``, :mod:`securefed.federation.site_he`) the site holds the
global model itself: it trains from its own copy, sends its update encrypted under the run's CKKS
key and signed, and decrypts each round's sum into its copy.

A failure of local training is a refusal of that round, not a crash of the federation.
Everything the site must remember is in its :class:`~securefed.federation.workspace.SiteWorkspace`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from securefed.errors import PrivacyBudgetExceeded, ProtocolAbort, ProtocolError, SecurefedError
from securefed.federation.messages import (
    Acknowledgement,
    EncryptedAggregate,
    KeyDelivery,
    KeyRequest,
    ModelRelease,
    SumConfirmation,
    PlainUpdate,
    ProtocolRelay,
    RoundStart,
    SiteRefusal,
    decode_federation_message,
    model_digest,
)
from securefed.federation.site_he import SiteHE
from securefed.federation.site_level import SITE_DP_NOTE, SiteLevelDP, rotation_seed
from securefed.federation.workspace import SiteWorkspace
from securefed.primitives.keys import Roster, SiteIdentity
from securefed.primitives.randomness import RandomSource, SeededRandom
from securefed.secagg.client import SecAggClient
from securefed.secagg.config import RoundConfig, SecAggConfig, round_config_problems
from securefed.secagg.messages import MaskedInput, RoundSetup, UnmaskShares, decode_message
from securefed.he.messages import HERoundSetup
from securefed.secagg.modular import ModularInput

__all__ = ["FederationSite", "LocalLearner", "training_round_id"]


class LocalLearner(Protocol):
    """What a site needs from local training (see :mod:`securefed.federation.local_training`)."""

    def train_round(self, global_vector: np.ndarray, *, round_id: str, replay_charged: bool = False) -> Any: ...

    def evaluate(self, vector: np.ndarray, data: Any) -> dict[str, float]: ...

    # Optional: ``parameter_count() -> int``, checked against every model the coordinator sends.


def training_round_id(round_: int) -> str:
    """The ledger's round id of federated round ``round_`` (1-based)."""
    return f"round-{round_}"


class FederationSite:
    def __init__(self, *, identity: SiteIdentity, roster: Roster, aggregation: str, policy: SecAggConfig,
                 workspace: SiteWorkspace, learner: Callable[[], LocalLearner], validation: Any,
                 rng: RandomSource, ledger: Any = None, site_dp: SiteLevelDP | None = None,
                 he: SiteHE | None = None) -> None:
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
        self.he = he
        self._site_charge: tuple[Any, Any] | None = None  # (ledger entry, encoder) awaiting its settle
        self.refusals: list[str] = []  # why this site refused or went silent (its own log)

    # ------------------------------------------------------------------ transport entry point
    def handle(self, data: bytes) -> bytes | None:
        try:
            message = decode_federation_message(data)
        except ProtocolError as exc:
            self.refusals.append(f"malformed message: {exc}")
            return None
        try:
            return self._dispatch(message)
        except Exception as exc:  # noqa: BLE001 - one site's failure must not stop the federation
            self.refusals.append(f"failed on {type(message).__name__}: {type(exc).__name__}: {exc}")
            self._client = None
            if isinstance(message, RoundStart):
                return self._untrained(message.round, f"the site failed ({type(exc).__name__})")
            return None

    def _dispatch(self, message: Any) -> bytes | None:
        if isinstance(message, RoundStart):
            return self._start_round(message)
        if isinstance(message, ProtocolRelay):
            return self._relay(message)
        if isinstance(message, ModelRelease):
            if self.he is not None:  # only the public initial model; later ones the site decrypts itself
                if message.round != 0:
                    return self._refuse(message.round, "under HE the coordinator has no model to release")
                self.he.store_initial(message.model)
            self._evaluate(message.round, message.model)
            return Acknowledgement(message.round).encode()
        if self.he is not None and isinstance(message, KeyRequest | KeyDelivery | EncryptedAggregate | SumConfirmation):
            return self._he_message(message)
        self.refusals.append(f"unexpected {type(message).__name__} from the coordinator")
        return None

    # ------------------------------------------------------------------ rounds
    def _refuse(self, round_: int, reason: str) -> bytes:
        self.refusals.append(f"round {round_}: {reason}")
        return SiteRefusal(round_, reason).encode()

    def _untrained(self, round_: int, reason: str) -> bytes:
        """Refuse a round whose training never charged DP-SGD: it does not count as trained here."""
        if not self._dp_sgd_charged(round_):
            state = self.workspace.load_state()
            state.trained.pop(round_, None)
            self.workspace.save_state(state)
        return self._refuse(round_, reason)

    def _dp_sgd_charged(self, round_: int) -> bool:
        from securefed.privacy.dpsgd_ledger import dp_sgd_round_ids

        return self._ledger is not None and training_round_id(round_) in dp_sgd_round_ids(self._ledger)

    def _mark_released(self, round_: int) -> None:
        state = self.workspace.load_state()
        state.released.add(round_)
        self.workspace.save_state(state)  # before the update leaves: a replay will sit the round out

    def learner(self) -> LocalLearner:
        if self._learner is None:
            self._learner = self._make_learner()
        return self._learner

    def _start_round(self, start: RoundStart) -> bytes | None:
        self._client, self._site_charge, self._round = None, None, start.round
        if start.aggregation != self.aggregation:
            return self._refuse(start.round, f"the federation aggregates with {self.aggregation!r}; "
                                             f"a {start.aggregation!r} round is refused")
        setup: Any = None
        if start.aggregation != "plain":
            try:
                setup = HERoundSetup.decode(start.setup) if self.he is not None else decode_message(start.setup)
            except ProtocolError as exc:
                return self._refuse(start.round, f"malformed protocol setup: {exc}")
            if not isinstance(setup, RoundSetup | HERoundSetup) or setup.round_id != start.protocol_round:
                return self._refuse(start.round, "the protocol setup is not this round's")
        state = self.workspace.load_state()
        previous = state.previous_protocol_round
        if previous is not None and start.protocol_round <= previous:
            return self._refuse(start.round, f"protocol round {start.protocol_round} is not above the last one "
                                             f"started ({previous}); replayed or stale rounds are refused")
        if start.round in state.released:
            return self._refuse(start.round, "this round's update already left this site in an earlier attempt; "
                                             "sitting out its replay keeps two releases from being combined")
        model, held = start.model, None
        if self.he is not None:  # the site's own copy of the global model; the coordinator has none
            held = self.he.held()
            if held is None:
                return self._refuse(start.round, "this site holds no global model yet")
            model = held.vector
        learner = self.learner()
        count = getattr(learner, "parameter_count", None)
        if not np.isfinite(model).all() or (count is not None and model.size != count()):
            return self._refuse(start.round, "the model sent has the wrong number of parameters or non-finite values")
        digest = model_digest(model).hex()
        trained_from = state.trained.get(start.round)
        if trained_from is not None and trained_from != digest:
            return self._refuse(start.round, "this round was already started from a different model")
        if isinstance(setup, HERoundSetup):
            problem = self.he.setup_problem(setup, model_size=model.size, held=held)  # type: ignore[union-attr]
            if problem is not None:
                return self._refuse(start.round, f"encrypted aggregation refused: {problem}")
        elif setup is not None:
            problem = self._setup_problem(setup.config, previous, model.size)
            if problem is not None:
                return self._refuse(start.round, f"secure aggregation refused: {problem}")
        state.previous_protocol_round = start.protocol_round
        state.trained[start.round] = digest
        self.workspace.save_state(state)  # before anything is charged or leaves this site
        try:
            self._evaluate(start.round - 1, model)
            if self._site_dp is not None:  # charged first: its refusal leaves DP-SGD's budget untouched
                if isinstance(setup, HERoundSetup):
                    self._charge_site_level(start.round, self.he.encoder(model.size),  # type: ignore[union-attr]
                                            threshold=self.he.min_sites,  # type: ignore[union-attr]
                                            vector_length=self.he.vector_size(model.size))  # type: ignore[union-attr]
                else:
                    self._charge_site_level(start.round, self._site_dp.encoder(
                        dimension=model.size, cohort=setup.config.n_sites, threshold=setup.config.threshold),
                        threshold=setup.config.threshold, vector_length=setup.config.vector_length)
            result = learner.train_round(model, round_id=training_round_id(start.round),
                                         replay_charged=trained_from is not None)
            update = np.asarray(result.update, dtype=np.float32)
            if update.shape != model.shape or not np.isfinite(update).all():
                raise ProtocolAbort("local training produced an update of the wrong shape or with NaN/inf")
        except PrivacyBudgetExceeded:
            return self._untrained(start.round, "privacy budget exhausted")
        except Exception as exc:  # noqa: BLE001 - this site sits the round out; the federation goes on
            self.refusals.append(f"round {start.round}: local training failed: {type(exc).__name__}: {exc}")
            return self._untrained(start.round, f"local training failed ({type(exc).__name__})")
        finally:
            self._publish_ledger()
        if start.aggregation == "plain":
            self._mark_released(start.round)
            return PlainUpdate(start.round, 1.0, update).encode()
        if isinstance(setup, HERoundSetup):
            upload = self.he.upload(setup, update, round_=start.round,  # type: ignore[union-attr]
                                    rng=self._fork(f"site-dp/{start.round}"), held=held)
            self._mark_released(start.round)
            return ProtocolRelay(start.protocol_round, upload).encode()
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

    def _setup_problem(self, config: RoundConfig, previous: int | None, model_size: int) -> str | None:
        """Why this site's secure-aggregation client would refuse ``config`` (None if it would not),
        checked before anything is charged or trained so a bogus configuration costs nothing."""
        if previous is not None and config.round_id <= previous:
            return f"round {config.round_id} is not newer than round {previous} (replay)"
        problems = round_config_problems(config, roster=self.roster, site_id=self.roster.index(self.name),
                                         policy=self.policy)
        if problems:
            return "refusing the round configuration: " + "; ".join(problems)
        expected = model_size
        if self._site_dp is not None:
            expected = self._site_dp.encoder(dimension=model_size, cohort=config.n_sites,
                                             threshold=config.threshold).padded_dimension
        if config.vector_length != expected:
            return f"the round sums {config.vector_length} values; this site's update has {expected}"
        return None

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
        if isinstance(reply, MaskedInput):
            self._mark_released(self._round)  # type: ignore[arg-type]
        if self._site_charge is not None and isinstance(reply, UnmaskShares):
            self._settle()
        return ProtocolRelay(relay.protocol_round, reply.encode()).encode()

    # ------------------------------------------------------------------ homomorphic encryption
    def _he_message(self, message: KeyRequest | KeyDelivery | EncryptedAggregate | SumConfirmation) -> bytes:
        assert self.he is not None
        if isinstance(message, KeyRequest):
            return self.he.deal(message).encode()
        if isinstance(message, KeyDelivery):
            try:
                self.he.receive_key(message)
            except SecurefedError as exc:
                return self._refuse(0, f"the HE key delivery was refused: {exc}")
            return Acknowledgement(0).encode()
        if isinstance(message, EncryptedAggregate):
            try:
                receipt = self.he.vouch(message)
            except SecurefedError as exc:
                return self._refuse(message.round, f"the encrypted sum was refused: {exc}")
            return receipt.encode()
        try:
            held, applied = self.he.confirm(message)
        except SecurefedError as exc:
            return self._refuse(message.round, f"the sum's confirmation was refused: {exc}")
        # A majority vouched for this one sum and it carried the tags of exactly its survivors,
        # this site among them: their noise is in it, so the worst-case charge comes down to them.
        if (applied is not None and self._site_charge is not None and self._round == message.round
                and self.roster.index(self.name) in applied.survivors):
            self._settle_to(len(set(applied.survivors)))
        self._evaluate(held.round, held.vector)
        return Acknowledgement(message.round).encode()

    # ------------------------------------------------------------------ site-level DP
    def _charge_site_level(self, round_: int, encoder: Any, *, threshold: int, vector_length: int) -> None:
        """Charge the worst case the protocol allows (``threshold`` sites' noise) before the update
        exists (a replay whose noised update never left this site reuses the earlier charge)."""
        from securefed.privacy.events import DistributedDiscreteGaussian
        from securefed.privacy.ledger_records import EntryKind

        assert self._site_dp is not None and self._ledger is not None
        if vector_length != encoder.padded_dimension:
            raise ProtocolAbort(f"the round sums {vector_length} values; site-level DP sends "
                                f"{encoder.padded_dimension}")
        key = training_round_id(round_)
        worst = encoder.event(sites=threshold)
        earlier = [e for e in self._ledger.entries() if e.kind is EntryKind.CHARGE and e.round_id == key
                   and isinstance(e.event, DistributedDiscreteGaussian)]
        if earlier and earlier[0].event != worst:
            raise ProtocolAbort("this round was charged for another site-level mechanism in an earlier attempt")
        charge = earlier[0] if earlier else self._ledger.charge(
            worst, round_id=key, note=f"{SITE_DP_NOTE}, worst case: {threshold} sites' noise")
        self._site_charge = (charge, encoder)

    def _settle(self) -> None:
        """Lower the worst-case charge to the noise of the survivors actually summed.

        Called once the client has accepted the unmask request, i.e. after it checked that
        ``threshold`` sites signed the same survivor list. Only on a complete graph does that
        cover every survivor; on a sparse graph the worst-case charge stands.
        """
        client = self._client
        survivors = client.survivors if client is not None else None
        if not survivors or client is None or client.config is None or client.config.neighbourhood_size != client.config.n_sites:
            self._site_charge = None
            return
        self._settle_to(len(survivors))

    def _settle_to(self, survivors: int) -> None:
        """Lower the pending worst-case charge to the noise of ``survivors`` sites."""
        charge, encoder = self._site_charge  # type: ignore[misc]
        self._site_charge = None
        try:
            actual = encoder.event(sites=survivors)
            if actual == charge.event:
                return
            self._ledger.settle(charge.seq, actual, note=f"{SITE_DP_NOTE}: {survivors} sites' noise in the sum")
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
