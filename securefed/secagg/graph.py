"""The neighbour graph: who shares secrets with and masks against whom.

Complete (classic SecAgg) or a random k-regular graph (SecAgg+): a Harary ring laid over a
permutation of the participants drawn from the public round seed, each site joined to the k/2
nearest sites on either side. Every client recomputes the graph from the signed round
configuration and so can check that the coordinator delivered exactly its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence

from securefed.primitives.randomness import SeededRandom, uniform_below

__all__ = ["NeighbourGraph"]


class NeighbourGraph:
    def __init__(self, participants: Sequence[int], neighbors: int | None, seed: bytes) -> None:
        self.participants = tuple(participants)
        n = len(self.participants)
        self.complete = neighbors is None or neighbors >= n - 1
        self._neighbours: dict[int, frozenset[int]] = {}
        self._neighbourhoods: dict[int, frozenset[int]] = {}
        self._everyone = frozenset(self.participants)
        if self.complete:
            return  # computed on demand: a client only ever asks about itself and a few peers
        order = _permutation(n, seed)
        ring = [self.participants[i] for i in order]
        half = int(neighbors or 0) // 2
        for pos, site in enumerate(ring):
            near = {ring[(pos + d) % n] for d in range(1, half + 1)}
            near |= {ring[(pos - d) % n] for d in range(1, half + 1)}
            self._neighbours[site] = frozenset(near)
            self._neighbourhoods[site] = frozenset(near | {site})

    def neighbours(self, site: int) -> frozenset[int]:
        """The sites ``site`` exchanges shares and pairwise masks with (not itself)."""
        found = self._neighbours.get(site)
        if found is None:
            if not (self.complete and site in self._everyone):
                raise KeyError(site)
            found = self._neighbours[site] = self._everyone - {site}
        return found

    def neighbourhood(self, site: int) -> frozenset[int]:
        """The holders of ``site``'s shares: its neighbours and itself."""
        if self.complete:
            if site not in self._everyone:
                raise KeyError(site)
            return self._everyone
        return self._neighbourhoods[site]

    def degree(self) -> int:
        return len(self.participants) - 1 if self.complete else len(next(iter(self._neighbours.values())))

    def __contains__(self, site: object) -> bool:
        return site in self._everyone


def _permutation(n: int, seed: bytes) -> list[int]:
    """Fisher-Yates with unbiased draws from a PRG keyed by the round seed."""
    rng = SeededRandom(b"securefed/secagg/v1/graph" + seed)
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(uniform_below(rng, i + 1, 1)[0])
        order[i], order[j] = order[j], order[i]
    return order
