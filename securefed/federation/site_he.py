"""A site's part in homomorphic-encryption rounds: its copy of the key, the global model it holds,
its signed encrypted uploads and the sums it decrypts.

Under ``aggregation = "he"`` the coordinator never holds a key or a plaintext model after the
public initial one. The key dealer (a site) makes the run's CKKS key and seals a copy to every
site (:mod:`securefed.he.keys`); each site keeps its copy in its workspace, readable by it alone,
and keeps the global model there too: the initial model, plus each round's decrypted mean. Every
site decrypts the same ciphertexts, so they all hold the same model; each round's setup names the
round whose model it starts from, and a site holding another refuses it.

Workspace files (next to those of :mod:`securefed.federation.workspace`)::

    he-context.key     the run's CKKS secret context (mode 0600)
    he-key.json        the run id, the dealer and the digests of the secret and public contexts
    global-model.bin   the global model this site holds and the round it is from
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import struct
from typing import Any

import numpy as np

from securefed.errors import ProtocolAbort, SecurefedError
from securefed.federation.messages import (
    EncryptedAggregate,
    KeyDeal,
    KeyDelivery,
    KeyRequest,
    SumConfirmation,
    SumReceipt,
    decode_federation_message,
    majority,
    sum_statement,
)
from securefed.federation.workspace import SiteWorkspace
from securefed.he.config import HEConfig
from securefed.he.keys import RUN_ID_SIZE, SealedContext, context_digest, key_id, open_context, seal_context
from securefed.he.messages import EncryptedUpload, HERoundSetup
from securefed.he.tags import TagKey, as_chunks, attach_tags, detach_tags, tag_tolerance, tagged_layout
from securefed.primitives._files import write_atomic
from securefed.primitives.keys import Roster, SiteIdentity
from securefed.serialization import Reader, Writer

__all__ = ["SiteHE", "HeldModel"]

_MODEL_MAGIC = b"SFGM"
_KEY_FORMAT = "securefed-he-key"
# The decrypted weight slot must be this close to the number of survivors (it is an integer; the
# CKKS error at the smallest scale used, site-level DP's integer sums, stays below 0.05).
WEIGHT_TOLERANCE = 0.25


class HeldModel:
    """The global model a site holds and the training round it is from (0: the initial model)."""

    def __init__(self, round_: int, vector: np.ndarray) -> None:
        self.round = round_
        self.vector = np.array(vector, dtype=np.float32)  # a writable copy (torch loads it)

    def encode(self) -> bytes:
        return Writer().fixed(_MODEL_MAGIC, 4).u8(1).u32(self.round).array(self.vector.astype("<f4")).getvalue()

    @classmethod
    def decode(cls, data: bytes) -> HeldModel:
        r = Reader(data, what="held global model")
        r.header(_MODEL_MAGIC, 1, kind="held global model")
        round_, vector = r.u32("round"), r.array("model")
        r.finish()
        return cls(round_, vector)


def model_file(workspace: SiteWorkspace) -> Any:
    return workspace.root / "global-model.bin"


def load_held_model(workspace: SiteWorkspace) -> HeldModel | None:
    """The model ``workspace``'s site holds, or None before it received the initial one."""
    path = model_file(workspace)
    return HeldModel.decode(path.read_bytes()) if path.exists() else None


class SiteHE:
    """One site's HE state and operations; bytes in, bytes out, through its workspace."""

    def __init__(self, *, identity: SiteIdentity, roster: Roster, workspace: SiteWorkspace, config: HEConfig,
                 min_sites: int, dealer: str, site_dp: Any = None, cohort: int = 0) -> None:
        """With ``site_dp`` (a :class:`~securefed.federation.site_level.SiteLevelDP`), updates are
        sent as noised ring elements for rounds of ``cohort`` sites (``config`` must then be the
        integer-sum configuration, :meth:`HEConfig.for_integers`)."""
        self.identity, self.roster, self.workspace = identity, roster, workspace
        self.config, self.min_sites, self.dealer = config, min_sites, dealer
        self.site_dp, self.cohort = site_dp, cohort
        self._codec: Any = None
        self._derived: tuple[TagKey, bytes] | None = None  # keys derived from the secret context

    # ------------------------------------------------------------------ the key
    @property
    def _context_file(self) -> Any:
        return self.workspace.root / "he-context.key"

    @property
    def _key_file(self) -> Any:
        return self.workspace.root / "he-key.json"

    def key_facts(self) -> dict[str, str] | None:
        """The run id, dealer and digests of the key this site holds (None: no key yet)."""
        if not self._key_file.exists():
            return None
        return json.loads(self._key_file.read_text())

    def deal(self, request: KeyRequest) -> KeyDeal:
        """As the dealer: make the run's key and seal a copy to every site of the roster."""
        from securefed.he.tenseal_ckks import new_context

        if self.identity.name != self.dealer:
            raise ProtocolAbort(f"site {self.identity.name!r} is not the federation's key dealer ({self.dealer!r})")
        if len(request.run_id) != RUN_ID_SIZE:
            raise ProtocolAbort(f"a run id has {RUN_ID_SIZE} bytes, got {len(request.run_id)}")
        if self.key_facts() is not None:
            raise ProtocolAbort("this site already holds a key for this run; a run keeps one key "
                                "(start a new run for a new key)")
        secret, public = new_context(self.config)
        sealed = seal_context(dealer=self.identity, roster=self.roster, secret_context=secret,
                              public_context=public, run_id=request.run_id)
        del secret
        return KeyDeal(public, {name: box.encode() for name, box in sealed.items()})

    def receive_key(self, delivery: KeyDelivery) -> None:
        """Check and keep this site's sealed copy of the run's key (again: the same key only)."""
        sealed = SealedContext.decode(delivery.sealed)
        public_digest = context_digest(delivery.public_context)
        secret = open_context(sealed, identity=self.identity, roster=self.roster, dealer=self.dealer,
                              run_id=delivery.run_id, public_digest=public_digest)
        held = self.key_facts()
        if held is not None:
            if held["secret_digest"] != sealed.secret_digest.hex() or held["run_id"] != delivery.run_id.hex():
                raise ProtocolAbort("this site already holds another key for this run; keys change only "
                                    "with a new run")
            return
        write_atomic(self._context_file, secret, mode=0o600, overwrite=True)
        facts = {"format": _KEY_FORMAT, "version": 1, "run_id": delivery.run_id.hex(), "dealer": self.dealer,
                 "secret_digest": sealed.secret_digest.hex(), "public_digest": public_digest.hex()}
        write_atomic(self._key_file, json.dumps(facts, indent=1).encode(), mode=0o644, overwrite=True)

    def codec(self) -> Any:
        """The CKKS codec under this site's copy of the key (TenSEAL loads on first use)."""
        if self._codec is None:
            from securefed.he.tenseal_ckks import CKKSCodec

            self._codec = CKKSCodec(self.config, self._secret_context())
        return self._codec

    def _secret_context(self) -> bytes:
        if self.key_facts() is None:
            raise ProtocolAbort("this site has not received the run's HE key")
        return self._context_file.read_bytes()

    def _keys(self) -> tuple[TagKey, bytes]:
        """The tag key and the model-tag key, derived once from the secret context."""
        if self._derived is None:
            secret = self._secret_context()
            bound = max(self.config.clip, self.config.max_weight)
            self._derived = (TagKey(secret, slots=self.config.slots, bound=bound),
                             hashlib.sha256(b"securefed/he/model-tag-key/v1" + secret).digest())
        return self._derived

    def key_id(self) -> bytes | None:
        """The id of the key this site holds (None: none yet), as uploads and setups name it."""
        facts = self.key_facts()
        if facts is None:
            return None
        return key_id(*(bytes.fromhex(facts[k]) for k in ("run_id", "secret_digest", "public_digest")))

    # ------------------------------------------------------------------ the model
    def held(self) -> HeldModel | None:
        return load_held_model(self.workspace)

    def store_initial(self, model: np.ndarray) -> None:
        """Keep the public initial model, unless this site already holds a model."""
        if self.held() is None:
            write_atomic(model_file(self.workspace), HeldModel(0, model).encode(), mode=0o600, overwrite=True)

    # ------------------------------------------------------------------ site-level DP
    def encoder(self, model_size: int) -> Any:
        """The site-level DP encoder every party derives alike (None without site-level DP)."""
        if self.site_dp is None:
            return None
        return self.site_dp.encoder(dimension=model_size, cohort=self.cohort, threshold=self.min_sites)

    def vector_size(self, model_size: int) -> int:
        """Values each site encrypts for a model of ``model_size`` (the weight aside)."""
        return model_size if self.site_dp is None else self.encoder(model_size).padded_dimension

    def rotation_seed(self, round_: int) -> bytes:
        """Round ``round_``'s public rotation seed, bound to the run's key."""
        return hashlib.sha256(b"securefed/he/site-dp-rotation/" + (self.key_id() or b"")
                              + struct.pack("<I", round_)).digest()

    # ------------------------------------------------------------------ a round
    def layout(self, model_size: int) -> tuple[int, int]:
        """(ciphertexts, values on the wire) of one upload: the update, the weight and the tag
        slots of every ciphertext (:mod:`securefed.he.tags`)."""
        return tagged_layout(self.vector_size(model_size) + 1, self.config.slots)

    def model_tag(self, held: HeldModel) -> bytes:
        """A digest of the held model under a key only the sites have: the coordinator can see
        whether two uploads started from the same model, and nothing else about it."""
        return hmac.new(self._keys()[1], struct.pack("<I", held.round) + held.vector.astype("<f4").tobytes(),
                        hashlib.sha256).digest()

    def setup_problem(self, setup: HERoundSetup, *, model_size: int, held: HeldModel | None = None) -> str | None:
        """Why this site refuses ``setup`` (None if it does not), before anything is charged;
        ``held`` is the model this site holds, if the caller has it read already."""
        me = self.roster.index(self.identity.name)
        if self.key_id() is None:
            return "this site has not received the run's HE key"
        if setup.context_digest != self.key_id():
            return "the round is encrypted under another CKKS key than the one this site holds"
        if me not in setup.participants or len(set(setup.participants)) != len(setup.participants):
            return "this site is not listed once among the round's participants"
        if any(not 0 <= i < len(self.roster) for i in setup.participants):
            return "the round lists participants that are not in the roster"
        if setup.min_sites < self.min_sites or len(setup.participants) < self.min_sites:
            return (f"the round would release a sum of fewer than the federation's min_sites = {self.min_sites} "
                    "sites")
        chunks, wire = self.layout(model_size)
        if setup.length != wire or setup.ciphertexts != chunks:
            return (f"the round sums {setup.length} values in {setup.ciphertexts} ciphertexts; this site sends "
                    f"{wire} in {chunks}")
        if self.site_dp is not None and len(setup.participants) > self.cohort:
            return f"the round has {len(setup.participants)} sites; site-level DP is set for {self.cohort}"
        held = held if held is not None else self.held()
        if held is None or held.round != setup.model_round:
            have = "no model" if held is None else f"the model after round {held.round}"
            return f"the round starts from the model after round {setup.model_round}; this site holds {have}"
        return None

    def upload(self, setup: HERoundSetup, update: np.ndarray, *, round_: int, rng: Any = None,
               held: HeldModel | None = None) -> bytes:
        """Encrypt ``update`` (clipped; weight 1 and the tags in their slots) and sign it for
        ``setup``'s round. With site-level DP the update is first clipped, noised and encoded
        with ``rng`` (secret)."""
        me = self.roster.index(self.identity.name)
        held = held if held is not None else self.held()
        assert held is not None and held.round == setup.model_round
        if self.site_dp is not None:  # ring elements, centred: CKKS sums them exactly
            ring = self.encoder(update.size).encode(update, round_seed=self.rotation_seed(round_), rng=rng)
            values = ring.view(np.int32 if ring.dtype == np.uint32 else np.int64).astype(np.float64)
        else:
            values = np.clip(np.asarray(update, dtype=np.float64), -self.config.clip, self.config.clip)
        data = as_chunks(np.append(values, 1.0), self.config.slots)
        tags = self._keys()[0].tag(data, round_=round_, model_round=setup.model_round, sender=me)
        ciphertexts = tuple(self.codec().encrypt_exact(attach_tags(data, tags)))
        unsigned = EncryptedUpload(setup.round_id, me, setup.context_digest, setup.length, ciphertexts,
                                   model_tag=self.model_tag(held))
        return dataclasses.replace(unsigned, signature=self.identity.sign(unsigned.statement())).encode()

    # ------------------------------------------------------------------ a round's sum
    # A sum is vouched for before it is decrypted, and decrypted only once a majority of the
    # roster vouched for the same one. Each site vouches for one sum per model it holds, so two
    # different sums from one model can never both have a majority: at most one sum from each
    # model is ever decrypted anywhere, and a coordinator gets one try per model.
    @property
    def quorum(self) -> int:
        return majority(len(self.roster))

    @property
    def _pending_files(self) -> tuple[Any, Any]:
        """The sum this site vouched for, and the last other one it was shown from its model."""
        return self.workspace.root / "pending-sum.bin", self.workspace.root / "pending-other-sum.bin"

    def _receipts(self) -> dict[str, dict[str, Any]]:
        """``vouched``: model round -> [round, digest] this site vouched for (one per model);
        ``applied``: round -> digest of the sum this site applied."""
        path = self.workspace.root / "he-receipts.json"
        return json.loads(path.read_text()) if path.exists() else {"vouched": {}, "applied": {}}

    def _save_receipts(self, receipts: dict[str, dict[str, Any]], held_round: int) -> None:
        # Models older than the one held can never be vouched from again: only their records go.
        kept = {"vouched": {k: v for k, v in receipts["vouched"].items() if int(k) >= held_round},
                "applied": {k: v for k, v in receipts["applied"].items() if int(k) > held_round - 10}}
        write_atomic(self.workspace.root / "he-receipts.json", json.dumps(kept).encode(), mode=0o600, overwrite=True)

    def _sum_problem(self, aggregate: EncryptedAggregate, held: HeldModel) -> str | None:
        """Why this site will not vouch for ``aggregate`` (checked without decrypting it)."""
        survivors = set(aggregate.survivors)
        if len(survivors) != len(aggregate.survivors) or len(survivors) < self.min_sites:
            return f"a sum of {len(survivors)} distinct sites is below min_sites = {self.min_sites}"
        if any(not 0 <= i < len(self.roster) for i in survivors):
            return "the sum names sites outside the roster"
        if self.site_dp is not None and len(survivors) > self.cohort:
            return f"the sum names {len(survivors)} sites; rounds have at most {self.cohort}"
        if aggregate.model_round != held.round or self.model_tag(held) != aggregate.model_tag:
            return (f"round {aggregate.round}'s sum applies to another model than the one this site holds (the "
                    f"model after round {held.round}); it is out of step")
        chunks, _ = self.layout(held.vector.size)
        if len(aggregate.ciphertexts) != chunks:
            return f"the sum has {len(aggregate.ciphertexts)} ciphertexts; this model's has {chunks}"
        return None

    def _receipt(self, aggregate: EncryptedAggregate, digest: bytes) -> SumReceipt:
        return SumReceipt(aggregate.round, digest, self.identity.sign(sum_statement(aggregate.round, digest)))

    def vouch(self, aggregate: EncryptedAggregate) -> SumReceipt:
        """Sign a receipt for a sum (the one sum from the held model this site vouches for,
        recorded before it signs) and keep the sum until it is confirmed."""
        held = self.held()
        if held is None:
            raise ProtocolAbort("this site holds no model yet")
        digest = aggregate.digest()
        receipts = self._receipts()
        if held.round == aggregate.round:  # asked again for a sum it applied: the same one only
            if receipts["applied"].get(str(aggregate.round)) != digest.hex():
                raise ProtocolAbort(f"this site applied another sum of round {aggregate.round}")
            return self._receipt(aggregate, digest)
        if aggregate.round < held.round:
            raise ProtocolAbort(f"this site is past round {aggregate.round}")
        problem = self._sum_problem(aggregate, held)
        if problem is not None:
            raise ProtocolAbort(problem)
        own, other = self._pending_files
        earlier = receipts["vouched"].get(str(held.round))
        if earlier is not None and earlier != [aggregate.round, digest.hex()]:
            # Kept all the same: a majority may confirm it without this site.
            write_atomic(other, aggregate.encode(), mode=0o600, overwrite=True)
            raise ProtocolAbort(f"this site already vouched for another sum from the model after round {held.round}")
        write_atomic(own, aggregate.encode(), mode=0o600, overwrite=True)
        if earlier is None:
            receipts["vouched"][str(held.round)] = [aggregate.round, digest.hex()]
            self._save_receipts(receipts, held.round)
        return self._receipt(aggregate, digest)

    def confirm(self, confirmation: SumConfirmation) -> tuple[HeldModel, EncryptedAggregate | None]:
        """Decrypt and apply a sum once a majority of the roster vouched for it (the sum this
        site kept; if it vouched for another from the same model, that one can no longer reach a
        majority): (the model now held, the sum applied; None if it was applied before)."""
        held = self.held()
        if held is None:
            raise ProtocolAbort("this site holds no model yet")
        receipts = self._receipts()
        if held.round == confirmation.round:
            if receipts["applied"].get(str(confirmation.round)) != confirmation.digest.hex():
                raise ProtocolAbort(f"this site applied another sum of round {confirmation.round}")
            return held, None
        statement = sum_statement(confirmation.round, confirmation.digest)
        valid = 0
        for index, signature in confirmation.signatures.items():
            if 0 <= index < len(self.roster):
                try:
                    self.roster[self.roster.names[index]].verify(statement, signature)
                    valid += 1
                except SecurefedError:
                    continue
        if valid < self.quorum:
            raise ProtocolAbort(f"{valid} sites vouched for round {confirmation.round}'s sum; a majority of the "
                                f"roster ({self.quorum}) must before any site decrypts it")
        kept = [decode_federation_message(p.read_bytes()) for p in self._pending_files if p.exists()]
        aggregate = next((a for a in kept if isinstance(a, EncryptedAggregate) and a.digest() == confirmation.digest),
                         None)
        if aggregate is None:
            raise ProtocolAbort(f"this site keeps no sum of round {confirmation.round} to apply; send it again")
        updated = self._decrypt_checked(aggregate, held)
        receipts["applied"][str(updated.round)] = confirmation.digest.hex()
        self._save_receipts(receipts, updated.round)
        write_atomic(model_file(self.workspace), updated.encode(), mode=0o600, overwrite=True)
        for path in self._pending_files:
            path.unlink(missing_ok=True)
        return updated, aggregate

    def _decrypt_checked(self, aggregate: EncryptedAggregate, held: HeldModel) -> HeldModel:
        """The model after ``aggregate`` if it is an honest sum of the sites it names for this
        round; ProtocolAbort, saying nothing of what it decrypted to, if not."""
        problem = self._sum_problem(aggregate, held)
        if problem is not None:
            raise ProtocolAbort(problem)
        survivors = sorted(aggregate.survivors)
        _, wire = self.layout(held.vector.size)
        data, tags = detach_tags(self.codec().decrypt(aggregate.ciphertexts, length=wire), self.config.slots)
        residual = self._keys()[0].residual(data, tags, round_=aggregate.round, model_round=aggregate.model_round,
                                            senders=survivors)
        values = data.reshape(-1)[:self.vector_size(held.vector.size) + 1]
        if residual > tag_tolerance(scale_bits=self.config.scale_bits, max_sites=self.config.max_sites) \
                or abs(values[-1] - len(survivors)) > WEIGHT_TOLERANCE:
            raise ProtocolAbort("the sum does not carry the tags of the sites reported in it for this round: it was "
                                "altered, relabelled, replayed or made of other uploads")
        total = values[:-1]
        if self.site_dp is not None:  # the exact modular sum of the noised encodings, decoded
            encoder = self.encoder(held.vector.size)
            ring = np.rint(total).astype(np.int64).astype(np.uint64).astype(encoder.dtype)
            total = encoder.decode(ring, round_seed=self.rotation_seed(aggregate.round))
        mean = total / len(survivors)
        if not np.isfinite(mean).all():
            raise ProtocolAbort("the decrypted sum holds non-finite values")
        # Rounded to float32 as it is kept: the low bits of a CKKS decryption never leave it.
        return HeldModel(aggregate.round, (held.vector.astype(np.float64) + mean).astype(np.float32))
