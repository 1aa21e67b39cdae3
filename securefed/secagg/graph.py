"""The neighbour graph: who shares secrets with and masks against whom.

Complete (classic SecAgg) or a random k-regular graph (SecAgg+): a Harary ring laid over a
permutation of the participants drawn from the public round seed, each site joined to the k/2
nearest sites on either side. Every client recomputes the graph from the signed round
configuration and so can check that the coordinator delivered exactly its neighbours.
Neighbourhoods are computed on demand: a client only ever asks about itself and a few peers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from securefed.primitives.randomness import SeededRandom

__all__ = ["NeighbourGraph"]


class NeighbourGraph:
    def __init__(self, participants: Sequence[int], neighbors: int | None, seed: bytes) -> None:
        self.participants = tuple(participants)
        n = len(self.participants)
        self.complete = neighbors is None or neighbors >= n - 1
        self._half = 0 if self.complete else int(neighbors or 0) // 2
        self._everyone = frozenset(self.participants)
        self._neighbours: dict[int, frozenset[int]] = {}
        self._neighbourhoods: dict[int, frozenset[int]] = {}
        if not self.complete:
            order = _permutation(n, seed)
            self._ring = [self.participants[i] for i in order.tolist()]
            # Ring position of the participant at index i, found by binary search on the ids.
            self._position = np.empty(n, dtype=np.int64)
            self._position[order] = np.arange(n)
            ids = np.asarray(self.participants, dtype=np.int64)
            self._by_id = np.argsort(ids, kind="stable")
            self._sorted = ids[self._by_id]

    def neighbours(self, site: int) -> frozenset[int]:
        """The sites ``site`` exchanges shares and pairwise masks with (not itself)."""
        found = self._neighbours.get(site)
        if found is None:
            if site not in self._everyone:
                raise KeyError(site)
            if self.complete:
                found = self._everyone - {site}
            else:
                n = len(self._ring)
                pos = self._ring_position(site)
                found = frozenset(
                    self._ring[(pos + d) % n] for d in range(-self._half, self._half + 1) if d
                )
            self._neighbours[site] = found
        return found

    def neighbourhood(self, site: int) -> frozenset[int]:
        """The holders of ``site``'s shares: its neighbours and itself."""
        if self.complete:
            if site not in self._everyone:
                raise KeyError(site)
            return self._everyone
        found = self._neighbourhoods.get(site)
        if found is None:
            found = self._neighbourhoods[site] = self.neighbours(site) | {site}
        return found

    def ring_distances(self, origin: int, sites: Sequence[int]) -> list[int]:
        """Steps from ``origin`` to each of ``sites`` around the ring (all 0 in the complete graph)."""
        if self.complete:
            return [0] * len(sites)
        n = len(self._ring)
        positions = self._ring_positions(np.asarray([origin, *sites], dtype=np.int64))
        d = np.abs(positions[1:] - positions[0]) % n
        return np.minimum(d, n - d).tolist()

    def _ring_positions(self, sites: np.ndarray) -> np.ndarray:
        return self._position[self._by_id[np.searchsorted(self._sorted, sites)]]

    def _ring_position(self, site: int) -> int:
        return int(self._ring_positions(np.asarray([site], dtype=np.int64))[0])

    def degree(self) -> int:
        return len(self.participants) - 1 if self.complete else 2 * self._half

    def __contains__(self, site: object) -> bool:
        return site in self._everyone


def _permutation(n: int, seed: bytes) -> np.ndarray:
    """A uniformly random permutation: sort n random 64-bit keys from a PRG keyed by the seed.

    Ties (probability about n^2 / 2^65) are broken by index, so every party gets the same order.
    """
    rng = SeededRandom(b"securefed/secagg/v1/graph" + seed)
    keys = np.frombuffer(rng.random_bytes(8 * n), dtype="<u8")
    return np.argsort(keys, kind="stable")
