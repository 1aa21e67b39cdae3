"""The coordinator's side of encrypted aggregation, as a pure state machine (no I/O, no TenSEAL).

It holds the roster, the digest of the agreed public context and the round's expectations. It
accepts each site's :class:`~securefed.he.messages.EncryptedUpload` only if the sender is a
participant, the signature verifies under its roster key, and the round, context, length and
number of ciphertexts are the agreed ones; otherwise it records why and goes on with the others.
``finish`` adds the accepted uploads with the ``add`` function it is given (the TenSEAL adapter
in practice) and reports who is in the sum. It never holds a key or a plaintext.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from securefed.errors import InvalidSignatureError, MalformedMessageError, ProtocolAbort, ProtocolError
from securefed.he.messages import MAX_CIPHERTEXT_BYTES, EncryptedUpload
from securefed.primitives.roster import Roster

__all__ = ["HEAggregator", "EncryptedTotal"]


@dataclass(frozen=True, eq=False)
class EncryptedTotal:
    """The encrypted sum and who is in it (the coordinator learns nothing else)."""

    round_id: int
    survivors: frozenset[int]
    ciphertexts: tuple[bytes, ...]
    rejected: dict[int, str]
    model_tag: bytes = bytes(32)  # the model tag the survivors' uploads share


class HEAggregator:
    def __init__(self, *, roster: Roster, round_id: int, participants: Sequence[int], context_digest: bytes,
                 length: int, ciphertexts: int, minimum: int = 1) -> None:
        """``length`` values (the weight slot included) in ``ciphertexts`` pieces per upload;
        ``minimum`` uploads are needed for a sum (fewer raise ProtocolAbort in ``finish``)."""
        self.roster = roster
        self.round_id = round_id
        self.participants = frozenset(participants)
        self.context_digest = bytes(context_digest)
        self.length, self.ciphertexts, self.minimum = length, ciphertexts, minimum
        self._identities = [roster[name] for name in roster.names]
        self._accepted: dict[int, EncryptedUpload] = {}
        self.rejected: dict[int, str] = {}
        self.finished = False

    def receive(self, data: bytes, *, from_site: int) -> None:
        """Accept one upload sent by ``from_site``, or record why not (ProtocolError is raised too)."""
        try:
            if self.finished:
                raise ProtocolAbort("the round is over")
            upload = EncryptedUpload.decode(data)
            self._check(upload, from_site)
        except ProtocolError as exc:
            self.rejected[from_site] = str(exc)
            raise
        except InvalidSignatureError as exc:
            self.rejected[from_site] = str(exc)
            raise ProtocolAbort(f"site {from_site}'s upload is not signed by it: {exc}") from None
        self._accepted[from_site] = upload

    def _check(self, upload: EncryptedUpload, from_site: int) -> None:
        if upload.sender != from_site or from_site not in self.participants:
            raise ProtocolAbort(f"an upload from site {from_site} names sender {upload.sender}, or the site is not "
                                "a participant of this round")
        if from_site in self._accepted:
            raise ProtocolAbort(f"site {from_site} already sent its upload")
        self._identities[from_site].verify(upload.statement(), upload.signature)
        if upload.round_id != self.round_id:
            raise ProtocolAbort(f"the upload is for round {upload.round_id}, this is round {self.round_id}")
        if upload.context_digest != self.context_digest:
            raise ProtocolAbort("the upload is encrypted for another CKKS context than the federation's")
        if upload.length != self.length or len(upload.ciphertexts) != self.ciphertexts:
            raise MalformedMessageError(f"the upload holds {upload.length} values in {len(upload.ciphertexts)} "
                                        f"ciphertexts; the round expects {self.length} in {self.ciphertexts}")
        if any(len(c) > MAX_CIPHERTEXT_BYTES for c in upload.ciphertexts):
            raise MalformedMessageError("a ciphertext is larger than any this context produces")

    def finish(self, add: Callable[[list[tuple[bytes, ...]]], list[bytes]]) -> EncryptedTotal:
        """Add the accepted uploads. An upload ``add`` cannot parse is left out and the rest retried."""
        if self.finished:
            raise ProtocolAbort("the round is over")
        self.finished = True
        accepted = self._same_model(dict(sorted(self._accepted.items())))
        while len(accepted) >= self.minimum:
            try:
                total = add([u.ciphertexts for u in accepted.values()])
                return EncryptedTotal(self.round_id, frozenset(accepted), tuple(total), dict(self.rejected),
                                      next(iter(accepted.values())).model_tag)
            except MalformedMessageError:
                culprit = self._find_unparsable(accepted, add)
                self.rejected[culprit] = "its ciphertexts are not valid under the federation's context"
                del accepted[culprit]
        raise ProtocolAbort(f"only {len(accepted)} valid uploads arrived; the round needs {self.minimum}")

    def _same_model(self, accepted: dict[int, EncryptedUpload]) -> dict[int, EncryptedUpload]:
        """Keep the uploads that started from the model most of them started from (ties: the one
        of the lowest site): a site whose model drifted would spoil the others' sum."""
        groups: dict[bytes, list[int]] = {}
        for site, upload in accepted.items():
            groups.setdefault(upload.model_tag, []).append(site)
        if len(groups) <= 1:
            return accepted
        keep = max(groups.values(), key=lambda sites: (len(sites), -min(sites)))
        for site in set(accepted) - set(keep):
            self.rejected[site] = "its update started from a different model than most sites' (it is out of step)"
        return {site: accepted[site] for site in keep}

    @staticmethod
    def _find_unparsable(accepted: dict[int, EncryptedUpload],
                         add: Callable[[list[tuple[bytes, ...]]], list[bytes]]) -> int:
        for site, upload in accepted.items():
            try:
                add([upload.ciphertexts])
            except MalformedMessageError:
                return site
        return next(iter(accepted))  # the fault is in combining them: drop the first and retry
