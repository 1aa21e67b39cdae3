"""The coordinator of ``aggregation = "he"``: it adds ciphertexts and never holds a key or a plaintext.

Before the first round it asks the key dealer (a site) for the run's CKKS key, sealed to every
site and signed, keeps only the public context (no secret key) and hands each site its sealed
copy. Each round it sends the round's setup (no model: the sites hold it), checks every signed
upload with :class:`~securefed.he.HEAggregator`, adds what verifies under the public context and
sends the encrypted sum to every site, which decrypts it into its copy of the global model. Sites
that drop, refuse or send what does not verify are left out and reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from securefed.errors import ConfigError, InvalidSignatureError, MalformedMessageError, ProtocolAbort, ProtocolError
from securefed.federation.coordinator import RoundOutcome
from securefed.federation.messages import (
    Acknowledgement,
    EncryptedAggregate,
    KeyDeal,
    KeyDelivery,
    KeyRequest,
    ProtocolRelay,
    RoundStart,
    SiteRefusal,
    SumConfirmation,
    SumReceipt,
    decode_federation_message,
    majority,
    sum_statement,
)
from securefed.federation.transport import Transport
from securefed.he.aggregator import HEAggregator
from securefed.he.config import HEConfig
from securefed.he.tags import tagged_layout
from securefed.he.keys import RUN_ID_SIZE, SealedContext, context_digest, key_id
from securefed.primitives.keys import Roster
from securefed.serialization import Reader, Writer

__all__ = ["HECoordinator", "HEKeys", "request_keys"]

_NO_MODEL = np.zeros(0, dtype=np.float32)  # the coordinator has no model to send
_KEYS_MAGIC = b"SFHS"


class HEKeys:
    """What the coordinator keeps of the run's key: the public context and the sealed copies."""

    def __init__(self, run_id: bytes, public_context: bytes, deliveries: dict[str, bytes]) -> None:
        self.run_id, self.public_context, self.deliveries = run_id, public_context, deliveries

    def key_id(self) -> bytes:
        """The id of the run's key (see :func:`securefed.he.keys.key_id`)."""
        secret_digest = SealedContext.decode(next(iter(self.deliveries.values()))).secret_digest
        return key_id(self.run_id, secret_digest, context_digest(self.public_context))

    def encode(self) -> bytes:
        deal = KeyDeal(self.public_context, self.deliveries).encode()
        return Writer().fixed(_KEYS_MAGIC, 4).u8(1).blob(self.run_id).blob(deal).getvalue()

    @classmethod
    def decode(cls, data: bytes) -> HEKeys:
        r = Reader(data, what="stored HE keys")
        r.header(_KEYS_MAGIC, 1, kind="stored HE keys")
        run_id, deal = r.blob("run id", max_size=64), decode_federation_message(r.blob("key deal"))
        r.finish()
        if not isinstance(deal, KeyDeal):
            raise MalformedMessageError("stored HE keys: not a key deal")
        return cls(run_id, deal.public_context, deal.deliveries)


def request_keys(transport: Transport, *, roster: Roster, dealer: str, run_id: bytes | None = None) -> HEKeys:
    """Ask ``dealer`` for a fresh key (a new random run id each time) and check what comes back
    is a delivery for every site of the roster, signed by the dealer, under one public context."""
    run_id = os.urandom(RUN_ID_SIZE) if run_id is None else run_id
    reply = transport.exchange({dealer: KeyRequest(run_id).encode()}).get(dealer)
    if reply is None:
        raise ProtocolAbort(f"the key dealer {dealer!r} did not answer; it must be reachable to start the run")
    deal = decode_federation_message(reply)
    if isinstance(deal, SiteRefusal):
        raise ProtocolAbort(f"the key dealer {dealer!r} refused: {deal.reason}")
    if not isinstance(deal, KeyDeal):
        raise ProtocolAbort(f"the key dealer {dealer!r} answered with {type(deal).__name__}")
    if set(deal.deliveries) != set(roster.names):
        raise ProtocolAbort("the key dealer's deliveries do not cover exactly the roster's sites")
    digest = context_digest(deal.public_context)
    secret_digests = set()
    for site, data in deal.deliveries.items():
        sealed = SealedContext.decode(data)
        roster[dealer].verify(sealed.statement(), sealed.signature)
        if sealed.site != site or sealed.run_id != run_id or sealed.public_digest != digest:
            raise ProtocolAbort(f"the key dealer's delivery for {site!r} is not for this site, run or key")
        secret_digests.add(sealed.secret_digest)
    if len(secret_digests) != 1:
        raise ProtocolAbort("the key dealer sealed different keys to different sites")
    return HEKeys(run_id, deal.public_context, deal.deliveries)


class HECoordinator:
    def __init__(self, *, roster: Roster, transport: Transport, config: HEConfig, keys: HEKeys,
                 min_sites: int) -> None:
        from securefed.he.tenseal_ckks import CKKSCodec

        self.roster, self.transport, self.config, self.keys = roster, transport, config, keys
        self.min_sites = min_sites
        self.codec = CKKSCodec(config, keys.public_context)
        if self.codec.holds_secret_key:
            raise ConfigError("the coordinator was given a context with the secret key; it must hold the "
                              "public context only")
        self.context_digest = keys.key_id()

    def deliver_keys(self, sites: Sequence[str]) -> dict[str, str]:
        """Hand each site its sealed copy of the key; return the sites that refused it and why."""
        outgoing = {s: KeyDelivery(self.keys.run_id, self.keys.public_context, self.keys.deliveries[s]).encode()
                    for s in sites}
        replies = self.transport.exchange(outgoing)
        problems = {}
        for site in sites:
            message = _decode_or_none(replies.get(site))
            if not isinstance(message, Acknowledgement):
                problems[site] = message.reason if isinstance(message, SiteRefusal) else "no acknowledgement"
        return problems

    def run_round(self, *, round_: int, protocol_round: int, cohort: Sequence[str], model_round: int,
                  model_size: int) -> RoundOutcome:
        """One round from the model after ``model_round``: return who is in the encrypted sum."""
        from securefed.he.messages import HERoundSetup

        cohort = tuple(cohort)
        indices = tuple(sorted(self.roster.index(s) for s in cohort))
        # The update, its weight, and one tag per ciphertext (securefed.he.tags).
        chunks, length = tagged_layout(model_size + 1, self.config.slots)
        setup = HERoundSetup(protocol_round, model_round, indices, self.context_digest, length, chunks,
                             self.min_sites)
        start = RoundStart(round_, protocol_round, "he", _NO_MODEL, setup.encode()).encode()
        replies = self.transport.exchange({s: start for s in cohort})
        aggregator = HEAggregator(roster=self.roster, round_id=protocol_round, participants=indices,
                                  context_digest=self.context_digest, length=length,
                                  ciphertexts=setup.ciphertexts, minimum=self.min_sites)
        refusals: dict[str, str] = {}
        rejected: dict[str, str] = {}
        for site in cohort:
            if site not in replies:
                continue
            try:
                message = decode_federation_message(replies[site])
                if isinstance(message, SiteRefusal):
                    refusals[site] = message.reason
                    continue
                if not isinstance(message, ProtocolRelay) or message.protocol_round != protocol_round:
                    raise ProtocolAbort(f"expected an encrypted upload for round {protocol_round}, got "
                                        f"{type(message).__name__}")
                aggregator.receive(bytes(message.payload), from_site=self.roster.index(site))
            except ProtocolError as exc:  # drop what does not verify and go on with the others
                rejected[site] = str(exc)
        try:
            total = aggregator.finish(self.codec.add)
        except ProtocolAbort as exc:
            return RoundOutcome(round_, cohort, (), None, refusals, rejected, f"encrypted aggregation: {exc}")
        names = self.roster.names
        for index, why in total.rejected.items():
            rejected.setdefault(names[index], why)
        survivors = tuple(names[i] for i in sorted(total.survivors))
        aggregate = EncryptedAggregate(round_, model_round, tuple(sorted(total.survivors)), total.ciphertexts,
                                       total.model_tag)
        return RoundOutcome(round_, cohort, survivors, None, refusals, rejected, encrypted=aggregate)

    @property
    def quorum(self) -> int:
        return majority(len(self.roster))

    def _receipts(self, round_: int, data: bytes, digest: bytes,
                  sites: Sequence[str]) -> tuple[dict[int, bytes], dict[str, str]]:
        """Send a sum (encoded as ``data``) to ``sites``: (roster index -> valid receipt
        signature, why the others gave none)."""
        statement = sum_statement(round_, digest)
        replies = self.transport.exchange({s: data for s in sites})
        signatures, problems = {}, {}
        for site in sites:
            message = _decode_or_none(replies.get(site))
            if isinstance(message, SumReceipt) and message.round == round_ and message.digest == digest:
                try:
                    self.roster[site].verify(statement, message.signature)
                    signatures[self.roster.index(site)] = message.signature
                    continue
                except InvalidSignatureError:
                    problems[site] = "its receipt is not signed by it"
                    continue
            problems[site] = message.reason if isinstance(message, SiteRefusal) else _NO_RECEIPT
        return signatures, problems

    def release(self, aggregate: EncryptedAggregate, sites: Sequence[str],
                confirmation: SumConfirmation | None = None,
                keep: Callable[[SumConfirmation], None] | None = None) -> tuple[dict[str, str], SumConfirmation | None]:
        """Send a round's encrypted sum to ``sites``, collect their signed receipts and, once a
        majority of the roster vouched for it (or with the ``confirmation`` of an earlier
        release, for sites catching up), confirm it; a new confirmation is handed to ``keep``
        before any site sees it. Return the sites that did not apply it, with why, and the
        confirmation (None if the sum was not confirmed)."""
        data, digest = aggregate.encode(), aggregate.digest()  # once: a sum is as large as an upload
        signatures, problems = self._receipts(aggregate.round, data, digest, sites)
        if confirmation is None and len(signatures) < self.quorum:  # receipts can be lost: ask the silent again
            silent = [s for s in sites if problems.get(s) == _NO_RECEIPT]
            if silent:
                more, problems_again = self._receipts(aggregate.round, data, digest, silent)
                signatures.update(more)
                problems = {s: p for s, p in {**problems, **problems_again}.items()
                            if self.roster.index(s) not in signatures}
        if confirmation is None:
            if len(signatures) < self.quorum:
                missing = dict(problems)
                for site in sites:
                    missing.setdefault(site, f"only {len(signatures)} sites vouched for the sum; "
                                             f"{self.quorum} (a majority) are needed")
                return missing, None
            confirmation = SumConfirmation(aggregate.round, digest, signatures)
            if keep is not None:  # on disk first: a confirmed sum is never taken for a failed one
                keep(confirmation)
        vouched = [s for s in sites if self.roster.index(s) in signatures]
        confirmed = confirmation.encode()
        acks = self.transport.exchange({s: confirmed for s in vouched}) if vouched else {}
        for site in vouched:
            message = _decode_or_none(acks.get(site))
            if not (isinstance(message, Acknowledgement) and message.round == aggregate.round):
                problems[site] = message.reason if isinstance(message, SiteRefusal) else "no acknowledgement"
        return problems, confirmation


_NO_RECEIPT = "no receipt for the sum"


def _decode_or_none(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return decode_federation_message(data)
    except ProtocolError:
        return None
