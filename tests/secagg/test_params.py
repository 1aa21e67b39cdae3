"""How k and t are chosen, the binomial tail behind it, and the Harary neighbour graph."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import deque
from fractions import Fraction

import pytest

from securefed.errors import ConfigError
from securefed.secagg import SecAggConfig, choose_parameters
from securefed.secagg.graph import NeighbourGraph
from securefed.secagg.params import (
    _log2_binom_tail_ge,
    default_threshold,
    minimum_threshold,
)

try:
    from scipy import stats as _scipy_stats
except ImportError:  # pragma: no cover - scipy is optional
    _scipy_stats = None


# ------------------------------------------------------------------------------- reference tail
def _exact_log2_tail(k: int, p: float, x: int) -> float:
    """log2 P[Binomial(k, p) >= x] from an exact rational sum."""
    if x <= 0:
        return 0.0
    if x > k:
        return -math.inf
    q = Fraction(p)
    total = sum(Fraction(math.comb(k, i)) * q**i * (1 - q) ** (k - i) for i in range(x, k + 1))
    if total == 0:
        return -math.inf
    # log2 of a Fraction without overflowing floats: split off the binary exponents.
    num, den = total.numerator, total.denominator
    shift_n, shift_d = max(num.bit_length() - 60, 0), max(den.bit_length() - 60, 0)
    return math.log2(num >> shift_n) + shift_n - math.log2(den >> shift_d) - shift_d


def _reference_log2_tail(k: int, p: float, x: int) -> float:
    if _scipy_stats is not None and 0 < p < 1 and 0 < x <= k:
        value = _scipy_stats.binom.logsf(x - 1, k, p) / math.log(2)
        if math.isfinite(value) and value > -1000:
            return value
    return _exact_log2_tail(k, p, x)


def _log2_tails(k: int, p: float) -> list[float]:
    """[log2 P[Binomial(k, p) >= x] for x = 0 .. k + 1], by a suffix log-sum-exp over the pmf
    (written independently of the library: exact binomial coefficients, natural logs)."""
    if p <= 0.0:
        return [0.0] + [-math.inf] * (k + 1)
    if p >= 1.0:
        return [0.0] * (k + 1) + [-math.inf]
    log_pmf = [math.log(math.comb(k, i)) + i * math.log(p) + (k - i) * math.log1p(-p) for i in range(k + 1)]
    tails = [-math.inf] * (k + 2)
    acc = -math.inf
    for i in range(k, -1, -1):
        hi, lo = max(acc, log_pmf[i]), min(acc, log_pmf[i])
        acc = hi + math.log1p(math.exp(lo - hi)) if lo > -math.inf else hi
        tails[i] = min(acc / math.log(2), 0.0)
    return tails


TAIL_CASES = [
    (k, p, x)
    for k in (1, 2, 5, 10, 26, 34, 86, 200)
    for p in (1e-6, 0.01, 0.1, 0.3, 0.5, 0.9, 0.999)
    for x in sorted({1, 2, k // 3, k // 2, k - 1, k})
    if x >= 1
]


@pytest.mark.parametrize("k, p, x", TAIL_CASES)
def test_binomial_tail_matches_reference(k: int, p: float, x: int) -> None:
    ours = _log2_binom_tail_ge(k, p, x)
    exact = _exact_log2_tail(k, p, x)
    assert ours == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert ours == pytest.approx(_reference_log2_tail(k, p, x), rel=1e-7, abs=1e-7)
    assert ours <= 1e-12  # a probability


def test_binomial_tail_edge_cases() -> None:
    assert _log2_binom_tail_ge(10, 0.3, 0) == 0.0
    assert _log2_binom_tail_ge(10, 0.3, -4) == 0.0
    assert _log2_binom_tail_ge(10, 0.3, 11) == -math.inf
    assert _log2_binom_tail_ge(10, 0.0, 1) == -math.inf
    assert _log2_binom_tail_ge(10, 1.0, 10) == 0.0
    assert _log2_binom_tail_ge(10, 0.5, 10) == pytest.approx(-10.0)
    assert _log2_binom_tail_ge(10, 0.5, 1) == pytest.approx(math.log2(1 - 2.0**-10))
    # Tiny tails stay finite and accurate where a direct float computation underflows.
    tiny = _log2_binom_tail_ge(500, 1e-3, 400)
    assert math.isfinite(tiny) and tiny == pytest.approx(_exact_log2_tail(500, 1e-3, 400), rel=1e-9)
    assert tiny < -3000


@pytest.mark.parametrize("k, p", [(1, 0.5), (7, 0.1), (20, 0.37), (40, 0.9), (30, 0.0), (30, 1.0)])
def test_reference_tail_table_matches_exact(k: int, p: float) -> None:
    """The helper the parameter checks use agrees with the exact rational computation."""
    table = _log2_tails(k, p)
    for x in range(k + 2):
        exact = 0.0 if x == 0 else (-math.inf if (p == 0.0 or x > k) else _exact_log2_tail(k, p, x))
        if p == 1.0 and x <= k:
            exact = 0.0
        assert table[x] == pytest.approx(exact, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("k, p", [(20, 0.1), (50, 0.37)])
def test_binomial_tail_is_decreasing_in_x(k: int, p: float) -> None:
    values = [_log2_binom_tail_ge(k, p, x) for x in range(0, k + 2)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.skipif(_scipy_stats is None, reason="scipy not installed")
def test_binomial_tail_against_scipy_grid() -> None:
    for k in range(1, 60, 7):
        for p in (0.05, 0.2, 0.5, 0.75):
            for x in range(1, k + 1):
                ref = _scipy_stats.binom.logsf(x - 1, k, p) / math.log(2)
                assert _log2_binom_tail_ge(k, p, x) == pytest.approx(ref, rel=1e-8, abs=1e-10)


# ------------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("m", range(1, 40))
def test_minimum_and_default_thresholds(m: int) -> None:
    t = minimum_threshold(m)
    assert 2 * t > m and 2 * (t - 1) <= m  # the smallest t exceeding half
    assert default_threshold(m) == t
    for c in range(0, m):
        tc = default_threshold(m, c)
        assert 2 * tc > m + c and 2 * (tc - 1) <= m + c


# ------------------------------------------------------------------------------- choose_parameters
def _disconnect_bound(n: int, k: int, d: float, g: float) -> float:
    return math.log2(n) + k * math.log2(d + g) if d + g > 0 else -math.inf


GRID = [
    (n, d, g, sigma, eta)
    for n in (2, 3, 10, 30, 100, 1000, 10000)
    for d in (0.0, 0.01, 0.1)
    for g in (0.0, 0.05)
    for sigma, eta in ((40, 20), (20, 10), (80, 30))
] + [(n, d, g, 40, 20) for n in (10, 30, 100) for d in (0.2, 0.3) for g in (0.1, 0.2)]


@pytest.mark.parametrize("n, d, g, sigma, eta", GRID)
def test_choice_meets_its_requirements(n: int, d: float, g: float, sigma: int, eta: int) -> None:
    choice = choose_parameters(n, dropout_rate=d, corrupt_fraction=g, security_bits=sigma, failure_bits=eta)
    t, c = choice.threshold, choice.corrupt_per_neighbourhood
    if choice.neighbors is None:
        m = n
        assert c == math.ceil(g * n)
        assert t == min(default_threshold(n, c), n)
        expected_fail = math.log2(n) + _log2_tails(n - 1, d)[min(n - t + 1, n)]
        if math.isfinite(expected_fail):
            assert choice.log2_failure == pytest.approx(expected_fail, abs=1e-6)
        else:
            assert choice.log2_failure == -math.inf
        if t < n or 2 * t > m + c:
            assert 2 * t > m + c or t == n
    else:
        k = choice.neighbors
        m = k + 1
        assert k % 2 == 0 and 2 <= k < n - 1
        assert 2 * t > m + c, "a coordinator could split a neighbourhood"
        assert t <= m
        # The reported bounds are right and meet what was asked.
        assert choice.log2_split_or_disconnect == pytest.approx(_disconnect_bound(n, k, d, g), abs=1e-9)
        assert choice.log2_split_or_disconnect <= -sigma
        fail = math.log2(n) + _log2_tails(k, d)[m - t + 1]
        assert choice.log2_failure == pytest.approx(fail, abs=1e-6)
        assert choice.log2_failure <= -eta
        # c bounds the corrupt neighbours except with probability 2**-sigma / n.
        corrupt_tails = _log2_tails(k, g)
        assert corrupt_tails[c + 1] <= -sigma - math.log2(n) + 1e-9
        if c > 0:
            assert corrupt_tails[c] > -sigma - math.log2(n) - 1e-9
        # ... and no smaller even k would have done.
        for smaller in range(2, k, 2):
            assert not _meets(n, smaller, d, g, sigma, eta)
    assert t >= 2 and t >= minimum_threshold(m)


def _meets(n: int, k: int, d: float, g: float, sigma: int, eta: int) -> bool:
    """The module's three requirements, recomputed from scratch for a given even k."""
    if _disconnect_bound(n, k, d, g) > -sigma:
        return False
    corrupt_tails = _log2_tails(k, g)
    c = next((c for c in range(k + 1) if corrupt_tails[c + 1] <= -sigma - math.log2(n)), k)
    t = (k + 1 + c) // 2 + 1
    if t > k + 1:
        return False
    return math.log2(n) + _log2_tails(k, d)[k + 1 - t + 1] <= -eta


@pytest.mark.parametrize(
    "n, g, k, t",
    [(100, 0.0, 30, 16), (1000, 0.0, 34, 18), (100, 0.05, 78, None), (1000, 0.05, 86, None)],
)
def test_documented_examples(n: int, g: float, k: int, t) -> None:
    choice = choose_parameters(n, corrupt_fraction=g)
    assert choice.neighbors == k
    if t is not None:
        assert choice.threshold == t


def test_neighbourhoods_grow_with_demands() -> None:
    def k_of(**kw) -> float:
        choice = choose_parameters(**kw)
        return math.inf if choice.neighbors is None else choice.neighbors

    for n in (100, 1000, 10000):
        ks = [k_of(n_sites=n, dropout_rate=d) for d in (0.0, 0.01, 0.05, 0.1, 0.2, 0.3)]
        assert ks == sorted(ks), f"k not monotone in the dropout rate at n={n}: {ks}"
        ks = [k_of(n_sites=n, security_bits=s) for s in (10, 20, 40, 80, 128)]
        assert ks == sorted(ks), f"k not monotone in security bits at n={n}: {ks}"
        ks = [k_of(n_sites=n, failure_bits=f) for f in (5, 10, 20, 40)]
        assert ks == sorted(ks)
        ks = [k_of(n_sites=n, corrupt_fraction=g) for g in (0.0, 0.01, 0.05, 0.1, 0.2)]
        assert ks == sorted(ks)
    sparse_ks = [choose_parameters(n).neighbors for n in (100, 300, 1000, 3000, 10000, 100000)]
    assert all(k is not None for k in sparse_ks)
    assert sparse_ks == sorted(sparse_ks)
    assert sparse_ks[-1] < 100  # grows only logarithmically
    # Thresholds stay a bit over half the neighbourhood.
    for n in (100, 1000, 10000):
        choice = choose_parameters(n)
        assert choice.threshold == minimum_threshold(choice.neighbors + 1)


@pytest.mark.slow
def test_choice_is_quick_when_no_sparse_graph_qualifies() -> None:
    """With a high dropout and corrupt rate no k < n - 1 qualifies and the answer is the
    complete graph; finding that out must not take minutes (secure_sum calls this for
    neighbors='auto'). Run in a child process so a slow search is cut off after 15 s."""
    code = (
        "from securefed.secagg import choose_parameters\n"
        "print(choose_parameters(2000, dropout_rate=0.3, corrupt_fraction=0.2).neighbors)\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("choose_parameters(2000, dropout_rate=0.3, corrupt_fraction=0.2) ran for over 15 s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


def test_small_federations_use_the_complete_graph() -> None:
    for n in range(2, 20):
        choice = choose_parameters(n)
        assert choice.neighbors is None
        assert choice.threshold == min(n // 2 + 1, n)
    assert choose_parameters(500, sparse=False).neighbors is None


def test_zero_dropout_and_corruption() -> None:
    choice = choose_parameters(1000, dropout_rate=0.0)
    assert choice.neighbors == 2 and choice.threshold == 2
    assert choice.log2_split_or_disconnect == -math.inf and choice.log2_failure == -math.inf


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"n_sites": 1}, "n_sites"),
        ({"n_sites": 10, "dropout_rate": 1.0}, "dropout_rate"),
        ({"n_sites": 10, "dropout_rate": -0.1}, "dropout_rate"),
        ({"n_sites": 10, "corrupt_fraction": 0.5}, "corrupt_fraction"),
        ({"n_sites": 10, "dropout_rate": 0.6, "corrupt_fraction": 0.45}, "below 1"),
    ],
)
def test_choose_parameters_rejects_bad_arguments(kwargs, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        choose_parameters(**kwargs)


def test_all_argument_problems_are_listed() -> None:
    with pytest.raises(ConfigError) as info:
        choose_parameters(0, dropout_rate=2.0, corrupt_fraction=0.9)
    assert len(info.value.problems) == 4


@pytest.mark.parametrize("n, neighbors, expected", [(10, 4, (4, 3)), (5, 4, (None, 3)), (6, 4, (4, 3)),
                                                    (9, None, (None, 5)), (12, 6, (6, 4))])
def test_config_resolve(n: int, neighbors, expected) -> None:
    assert SecAggConfig(neighbors=neighbors).resolve(n) == expected


def test_config_resolve_with_corruption_and_explicit_threshold() -> None:
    assert SecAggConfig(corrupt_fraction=0.2).resolve(10) == (None, (10 + 2) // 2 + 1)
    assert SecAggConfig(neighbors=4, threshold=5).resolve(10) == (4, 5)
    auto = SecAggConfig(neighbors="auto").resolve(1000)
    choice = choose_parameters(1000)
    assert auto == (choice.neighbors, choice.threshold)


# ------------------------------------------------------------------------------- the graph
SEED_A = bytes(range(32))
SEED_B = bytes(range(1, 33))


def _adjacency(graph: NeighbourGraph) -> dict[int, frozenset[int]]:
    return {p: graph.neighbours(p) for p in graph.participants}


@pytest.mark.parametrize("n, k", [(5, 2), (8, 4), (12, 4), (13, 6), (30, 8), (101, 10), (64, 62)])
def test_harary_graph_is_regular_symmetric_and_connected(n: int, k: int) -> None:
    graph = NeighbourGraph(range(n), k, SEED_A)
    assert not graph.complete
    adj = _adjacency(graph)
    assert graph.degree() == k
    for site, near in adj.items():
        assert len(near) == k, f"site {site} has {len(near)} neighbours"
        assert site not in near
        assert near <= set(range(n))
        assert graph.neighbourhood(site) == near | {site}
        for other in near:
            assert site in adj[other], "neighbourhood is not symmetric"
    # Connected (breadth-first search from site 0 reaches everyone).
    seen, queue = {0}, deque([0])
    while queue:
        for nxt in adj[queue.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    assert seen == set(range(n))
    if 2 * k >= n:
        return  # near-complete: the ring order below is not recoverable by the simple walk
    # A Harary ring: there is a cyclic order where each site's neighbours are the k/2 on each side.
    order = _ring_order(adj)
    pos = {s: i for i, s in enumerate(order)}
    for site, near in adj.items():
        offsets = {min((pos[o] - pos[site]) % n, (pos[site] - pos[o]) % n) for o in near}
        assert offsets == set(range(1, k // 2 + 1))


def _ring_order(adj: dict[int, frozenset[int]]) -> list[int]:
    """Recover the ring: walk from a site to the unvisited neighbour sharing the most neighbours."""
    start = min(adj)
    order, seen = [start], {start}
    while len(order) < len(adj):
        here = order[-1]
        candidates = [o for o in adj[here] if o not in seen]
        nxt = max(candidates, key=lambda o: (len(adj[o] & adj[here]), -o))
        order.append(nxt)
        seen.add(nxt)
    return order


def test_graph_is_deterministic_and_seed_dependent() -> None:
    n, k = 20, 4
    a1 = _adjacency(NeighbourGraph(range(n), k, SEED_A))
    a2 = _adjacency(NeighbourGraph(list(range(n)), k, SEED_A))
    b = _adjacency(NeighbourGraph(range(n), k, SEED_B))
    assert a1 == a2
    assert a1 != b
    # Many seeds give many different graphs (the permutation is really drawn from the seed).
    distinct = {tuple(sorted(_adjacency(NeighbourGraph(range(n), k, bytes([i]) * 32))[0])) for i in range(20)}
    assert len(distinct) >= 10


def test_graph_on_sparse_participant_ids() -> None:
    ids = (3, 7, 8, 20, 21, 40, 41, 99)
    graph = NeighbourGraph(ids, 4, SEED_A)
    for site in ids:
        near = graph.neighbours(site)
        assert len(near) == 4 and site not in near and near <= set(ids)


@pytest.mark.parametrize("n, k", [(5, None), (5, 4), (5, 6), (3, 2), (2, None)])
def test_complete_graph_when_k_reaches_n_minus_one(n: int, k) -> None:
    graph = NeighbourGraph(range(n), k, SEED_A)
    assert graph.complete
    assert graph.degree() == n - 1
    for site in range(n):
        assert graph.neighbours(site) == frozenset(range(n)) - {site}
        assert graph.neighbourhood(site) == frozenset(range(n))


def test_graph_is_roughly_uniform_over_pairs() -> None:
    """Across seeds, every pair of sites is neighbours about k / (n - 1) of the time."""
    n, k, trials = 10, 2, 300
    counts = {}
    for i in range(trials):
        graph = NeighbourGraph(range(n), k, i.to_bytes(32, "little"))
        for a in range(n):
            for b in graph.neighbours(a):
                if a < b:
                    counts[a, b] = counts.get((a, b), 0) + 1
    expected = trials * k / (n - 1)
    assert len(counts) == n * (n - 1) // 2
    assert all(abs(c - expected) < 6 * math.sqrt(expected) for c in counts.values()), counts


def test_sparse_graph_over_arbitrary_participant_ids_is_symmetric_and_regular() -> None:
    ids = [9, 3, 7, 1, 5, 11, 2, 8, 40, 17]
    graph = NeighbourGraph(ids, 4, b"\x07" * 32)
    for site in ids:
        near = graph.neighbours(site)
        assert len(near) == 4 and site not in near and near <= set(ids)
        assert all(site in graph.neighbours(peer) for peer in near)
        assert graph.neighbourhood(site) == near | {site}
