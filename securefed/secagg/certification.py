"""When a holder may reveal a share: survivor-list certificates over neighbourhoods.

In the consistency check every surviving site signs the survivor list L it was shown. A list is
*certified in the neighbourhood of o* when ``threshold`` members of o's neighbourhood signed it.
Honest sites sign one list per round and 2t > m, so at most one list is certified in any
neighbourhood. Before revealing anything, a holder h requires, on its own list L:

* R0 — L certified in h's own neighbourhood;
* R1 — for a key share of a dropped site v: L certified in v's neighbourhood;
* R2 — for the self-mask share of a survivor u (u != h): L certified in u's neighbourhood, and,
  in a sparse graph, u's signed attestation (sent with its masked input) that it masked
  against h.

Why R2 protects u: u applied a pairwise mask with h (its attestation says so). h is certified in
its own neighbourhood (R0), so no list without h is certified there and h's key is never
revealed (R1); u is certified in its neighbourhood, so u's key is never revealed either. The
mask between u and h therefore stays on u's upload. Without R1/R2 a coordinator can certify
different lists in different parts of a sparse graph: it gives a site only a few neighbours'
shares, shows it and them a list where they survive, shows everyone else a list where those
neighbours dropped, and collects the target's self-mask share from one group and the
neighbours' key shares from the other. In the complete graph every neighbourhood is the whole
cohort and R0 alone already makes the certified list unique.
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
    ) -> None:
        self._graph = graph
        self._threshold = threshold
        self._signatures = dict(signatures)
        self._verify = verify  # raises if the signature does not verify on the holder's list
        self._checked: set[int] = set()

    def signed(self, site: int) -> bool:
        """Whether ``site`` signed the holder's list (verifying its signature if not done yet)."""
        signature = self._signatures.get(site)
        if signature is None:
            return False
        if site not in self._checked:
            self._verify(site, signature)
            self._checked.add(site)
        return True

    def certified(self, owner: int) -> bool:
        """Whether ``threshold`` members of ``owner``'s neighbourhood signed the holder's list."""
        members = self._graph.neighbourhood(owner)
        # Already-verified signers first, so overlapping neighbourhoods verify each signer once.
        ordered = sorted(members & self._signatures.keys(), key=lambda s: (s not in self._checked, s))
        count = 0
        for signer in ordered:
            if self.signed(signer):
                count += 1
                if count >= self._threshold:
                    return True
        return False
