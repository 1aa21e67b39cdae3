"""Delivery of the CKKS secret context: sealed per site, signed by the dealer, checked by each site."""

from __future__ import annotations

import dataclasses
import os

import pytest

from securefed.errors import DecryptionError, InvalidSignatureError, MalformedMessageError, ProtocolAbort
from securefed.he.keys import SealedContext, context_digest, open_context, seal_context
from securefed.primitives.identity import SiteIdentity
from securefed.primitives.randomness import SeededRandom
from securefed.primitives.roster import Roster
from securefed.primitives.sealed import open_sealed

SECRET = b"ckks secret context " * 50
PUBLIC = b"ckks public context " * 20


@pytest.fixture()
def federation():
    identities = {n: SiteIdentity.generate(n, SeededRandom(f"he-keys/{n}")) for n in ("dealer", "a", "b", "c")}
    roster = Roster([i.public() for i in identities.values()])
    run_id = os.urandom(16)
    deliveries = seal_context(dealer=identities["dealer"], roster=roster, secret_context=SECRET,
                              public_context=PUBLIC, run_id=run_id)
    return identities, roster, run_id, deliveries


def _open(delivery, identity, roster, run_id, **kw):
    return open_context(delivery, identity=identity, roster=roster, dealer="dealer", run_id=run_id, **kw)


def test_every_site_opens_its_own_copy_of_the_same_key(federation):
    identities, roster, run_id, deliveries = federation
    assert set(deliveries) == set(roster.names)
    for name in ("a", "b", "c"):
        delivery = SealedContext.decode(deliveries[name].encode())  # as received over the wire
        assert _open(delivery, identities[name], roster, run_id, public_digest=context_digest(PUBLIC)) == SECRET
    # Every copy is signed over the same digests: the sites can compare them.
    assert len({(d.secret_digest, d.public_digest) for d in deliveries.values()}) == 1
    # The boxes differ (fresh ephemeral keys) and none holds the key in the clear.
    assert len({d.sealed for d in deliveries.values()}) == len(deliveries)
    assert all(SECRET[:64] not in d.encode() for d in deliveries.values())


def test_the_coordinator_and_other_sites_cannot_open_a_site_s_box(federation):
    identities, roster, run_id, deliveries = federation
    coordinator = SiteIdentity.generate("coordinator")  # any key not the recipient's
    for name in ("a", "b", "c", "dealer"):
        with pytest.raises(DecryptionError):
            open_sealed(coordinator, deliveries[name].sealed)
    with pytest.raises(DecryptionError):
        open_sealed(identities["b"], deliveries["a"].sealed)
    with pytest.raises(ProtocolAbort, match="for site 'a'"):
        _open(deliveries["a"], identities["b"], roster, run_id)


def test_a_forged_or_altered_delivery_is_refused(federation):
    identities, roster, run_id, deliveries = federation
    delivery = deliveries["a"]
    # Someone other than the dealer seals its own key to site a and signs it.
    mallory = SiteIdentity.generate("mallory")
    forged = seal_context(dealer=identities["b"], roster=roster, secret_context=b"mallory's key",
                          public_context=PUBLIC, run_id=run_id)["a"]
    with pytest.raises(InvalidSignatureError):
        _open(forged, identities["a"], roster, run_id)  # signed by b, not by the agreed dealer
    with pytest.raises(InvalidSignatureError):
        _open(dataclasses.replace(forged, dealer="dealer"), identities["a"], roster, run_id)
    box = bytearray(delivery.sealed)
    box[-1] ^= 1
    with pytest.raises(InvalidSignatureError):  # the signature covers the box
        _open(dataclasses.replace(delivery, sealed=bytes(box)), identities["a"], roster, run_id)
    with pytest.raises(InvalidSignatureError):
        _open(dataclasses.replace(delivery, signature=mallory.sign(delivery.statement())), identities["a"], roster,
              run_id)


def test_a_key_from_another_run_or_for_another_public_context_is_refused(federation):
    identities, roster, run_id, deliveries = federation
    with pytest.raises(ProtocolAbort, match="another run"):
        _open(deliveries["a"], identities["a"], roster, os.urandom(16))
    with pytest.raises(ProtocolAbort, match="public context"):
        _open(deliveries["a"], identities["a"], roster, run_id, public_digest=context_digest(b"other"))


def test_a_dealer_that_lies_about_the_digest_is_caught(federation):
    identities, roster, run_id, _ = federation
    dealer = identities["dealer"]
    honest = seal_context(dealer=dealer, roster=roster, secret_context=SECRET, public_context=PUBLIC,
                          run_id=run_id)["a"]
    lying = dataclasses.replace(honest, secret_digest=context_digest(b"what the others got"))
    lying = dataclasses.replace(lying, signature=dealer.sign(lying.statement()))
    with pytest.raises(ProtocolAbort, match="does not match"):
        _open(lying, identities["a"], roster, run_id)


def test_bad_bytes_and_bad_arguments(federation):
    identities, roster, run_id, deliveries = federation
    data = deliveries["a"].encode()
    for cut in (0, 5, 30, len(data) - 1):
        with pytest.raises(MalformedMessageError):
            SealedContext.decode(data[:cut])
    with pytest.raises(MalformedMessageError):
        SealedContext.decode(data + b"\0")
    with pytest.raises(ProtocolAbort, match="run_id"):
        seal_context(dealer=identities["dealer"], roster=roster, secret_context=SECRET, public_context=PUBLIC,
                     run_id=b"short")
    with pytest.raises(ProtocolAbort, match="not in the federation roster"):
        seal_context(dealer=SiteIdentity.generate("outsider"), roster=roster, secret_context=SECRET,
                     public_context=PUBLIC, run_id=run_id)
