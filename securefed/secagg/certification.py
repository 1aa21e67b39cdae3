"""When a holder may reveal a share: survivor-list certificates over neighbourhoods.

In the consistency check every surviving site signs the survivor list L it was shown. A list is
*certified in the neighbourhood of o* when ``threshold`` members of o's neighbourhood signed it.
Honest sites sign one list per round and 2t > m, so at most one list is certified in any
neighbourhood. "One list per round" holds because a site never takes part twice in the same
round id (``SecAggClient(previous_round=...)``, which a deployment persists); otherwise a
coordinator could re-run a round and relay signatures from the earlier run. Before revealing anything, a holder h requires, on its own list L:

* R0 — L certified in h's own neighbourhood;
* R1 — for a key share of a dropped site v: L certified in v's neighbourhood;
* R2 — for the self-mask share of a survivor u (u != h): L certified in u's neighbourhood, and,
  in a sparse graph, u's attestation (sent with its masked input) that it masked against h: a
  MAC under a key only u and h derive from their X25519 agreement, which the coordinator cannot
  forge.

Why R2 protects u: u applied a pairwise mask with h (its attestation says so). h is certified in
its own neighbourhood (R0), so no list without h is certified there and h's key is never
revealed (R1); u is certified in its neighbourhood, so u's key is never revealed either. The
mask between u and h therefore stays on u's upload. Without R1/R2 a coordinator can certify
different lists in different parts of a sparse graph: it gives a site only a few neighbours'
shares, shows it and them a list where they survive, shows everyone else a list where those
neighbours dropped, and collects the target's self-mask share from one group and the
neighbours' key shares from the other.

In the complete graph every neighbourhood is the whole cohort, so R0 makes the certified list
unique, and attestations are not needed: a survivor u signs a list only if every survivor on it
sent u its shares (so u masked against all of them) and at least t sites did. A certified list
that drops all of u's mask partners M but keeps u must get t signatures from outside M, but
u itself does not sign it (it names survivors that sent u nothing, or is shorter than t), which
leaves at most n - |M| - 1 <= n - t < t signers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from securefed.secagg.graph import NeighbourGraph

__all__ = ["Certificates", "certified_count"]


def certified_count(graph: NeighbourGraph, owner: int, signers: Collection[int]) -> int:
    """How many members of ``owner``'s neighbourhood are among ``signers``."""
    return len(graph.neighbourhood(owner) & set(signers))


class Certificates:
    """A holder's view of the relayed signatures, each verified at most once, on demand."""

    def __init__(
        self,
        *,
        graph: NeighbourGraph,
        threshold: int,
        signatures: Mapping[int, bytes],
        verify: Callable[[int, bytes], None],
        holder: int | None = None,
        confirmations: Mapping[int, bytes] | None = None,
        verify_confirmation: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self._graph = graph
        self._threshold = threshold
        # A neighbour's MAC confirmation stands in for its signature (same list, cheaper check).
        self._confirmations = dict(confirmations or {}) if verify_confirmation else {}
        self._signatures = {**dict(signatures), **self._confirmations}
        self._verify = verify  # raises if the signature does not verify on the holder's list
        self._verify_confirmation = verify_confirmation
        self._checked: set[int] = set() if holder is None else {holder}  # the holder signed its own list
        self._certified: dict[frozenset[int], bool] = {}
        if holder is not None:
            self._signatures.setdefault(holder, b"")
        signers = sorted(self._signatures)
        distances = graph.ring_distances(holder, signers) if holder is not None else [0] * len(signers)
        self._distance = dict(zip(signers, distances))

    def signed(self, site: int) -> bool:
        """Whether ``site`` signed the holder's list (verifying its signature if not done yet)."""
        signature = self._signatures.get(site)
        if signature is None:
            return False
        if site not in self._checked:
            if site in self._confirmations and self._verify_confirmation is not None:
                self._verify_confirmation(site, signature)
            else:
                self._verify(site, signature)
            self._checked.add(site)
        return True

    def certified(self, owner: int) -> bool:
        """Whether ``threshold`` members of ``owner``'s neighbourhood signed the holder's list."""
        members = self._graph.neighbourhood(owner)
        known = self._certified.get(members)
        if known is not None:  # in the complete graph every owner has the same neighbourhood
            return known
        self._certified[members] = result = self._count_up_to_threshold(members)
        return result

    def _count_up_to_threshold(self, members: frozenset[int]) -> bool:
        # Already-verified signers first, then those nearest the holder on the ring: they lie in
        # most of the neighbourhoods the holder asks about, so few signatures cover them all.
        ordered = sorted(
            members & self._signatures.keys(),
            key=lambda s: (s not in self._checked, self._distance[s], s),
        )
        count = 0
        for signer in ordered:
            if self.signed(signer):
                count += 1
                if count >= self._threshold:
                    return True
        return False
