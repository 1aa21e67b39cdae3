"""The checks of a federation config that look across sections and modules (no data loading).

``validate`` is exported by :mod:`securefed.federation.config`; it lives here to keep that
module to reading and writing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from securefed.data import DataConfig
from securefed.errors import ConfigError
from securefed._values import is_int
from securefed.federation.config_sections import Aggregation

if TYPE_CHECKING:
    from securefed.data import TaskSpec
    from securefed.federation.config import FederationConfig

__all__ = ["validate", "prefixed", "known_spec"]


def prefixed(label: str, problems: list[str]) -> list[str]:
    """Say where each problem is ("[privacy] ...") unless it already does ("data.alpha ...")."""
    name = label.strip("[]")
    return [p if p.startswith(("[", f"{name}.", f"{name}:")) else f"{label} {p}" for p in problems]


_BREAST_CANCER_FEATURES = 30  # the Wisconsin data's 30 real-valued features


def known_spec(data: DataConfig) -> TaskSpec | None:
    """The task spec of an embedded data kind (known without loading); None for the user's files."""
    from securefed.data import DataKind, TaskKind, TaskSpec
    from securefed.data.embedded import synthetic_shape

    if data.kind is DataKind.BREAST_CANCER:
        return TaskSpec(kind=TaskKind.CLASSIFICATION, input_shape=(_BREAST_CANCER_FEATURES,),
                        spatial_dims=0, num_classes=2)
    if data.kind in (DataKind.SYNTHETIC_SEG2D, DataKind.SYNTHETIC_SEG3D):
        dims = 2 if data.kind is DataKind.SYNTHETIC_SEG2D else 3
        return TaskSpec(kind=TaskKind.SEGMENTATION, input_shape=(1,) + (synthetic_shape(data)[1],) * dims,
                        spatial_dims=dims, num_classes=2)
    return None


def _model_problems(config: FederationConfig) -> list[str]:
    # The user's own data has to be opened to know its shape: the run checks the model then.
    from securefed.models import model_problems

    spec = known_spec(config.data)
    return [] if spec is None else prefixed("[model]", model_problems(config.model, spec))


def _secagg_problems(config: FederationConfig) -> list[str]:
    if config.federation.aggregation is not Aggregation.SECAGG:
        return []
    n = config.cohort_size()
    if n < 2:
        return [f"[secagg] secure aggregation needs at least 2 sites per round, but sites_per_round = {n}; "
                "raise sites_per_round (or 0 for every site) or use aggregation = \"plain\""]
    try:  # the same checks every site runs on a round's configuration
        config.secagg_config().round_config(n_sites=n, vector_length=1, round_id=0,
                                            roster_digest=bytes(32), graph_seed=bytes(32))
    except ConfigError as error:
        return [f"[secagg] with {n} sites per round: {p}" for p in error.problems]
    return []


def he_problems(*, run: Any, sites: Any, he: Any, raw_he: dict[str, Any], site_dp: Any, bit_width: int) -> list[str]:
    """The ``[he]`` checks that need the cohort: also run on sections that parsed when others did
    not (``he`` None: from the raw values that have the right type), so every problem is said at once."""
    if run is None or run.aggregation is not Aggregation.HE or sites is None:
        return []
    names = [s.name for s in sites]
    n = run.sites_per_round or len(names)
    min_sites = he.min_sites if he is not None else raw_he.get("min_sites", 2)
    dealer = he.dealer if he is not None else raw_he.get("dealer", "")
    problems = []
    if is_int(min_sites) and n < min_sites:
        problems.append(f"[he] min_sites = {min_sites} is more than the {n} sites in each round; lower "
                        "min_sites or raise sites_per_round (0 for every site)")
    if isinstance(dealer, str) and dealer and dealer not in names:
        problems.append(f"[he] dealer = {dealer!r} is not one of the sites ({', '.join(names[:5])}"
                        f"{', ...' if len(names) > 5 else ''}); name a site, or \"\" for the first")
    if he is None:
        return problems
    try:  # the sum of a whole round must fit the ciphertext modulus, and sites must be able to check it
        config = he.he_config(max_sites=n, integer_bits=bit_width if site_dp is not None and site_dp.enabled else None)
    except ConfigError as error:
        problems.extend(f"[he] with {n} sites per round: {p}" for p in error.problems)
    else:
        from securefed.he.tags import tag_problems

        problems.extend(f"[he] {p}" for p in tag_problems(scale_bits=config.scale_bits, max_sites=n,
                                                          bound=max(config.clip, config.max_weight)))
    return problems


def _he_problems(config: FederationConfig) -> list[str]:
    return he_problems(run=config.federation, sites=config.sites, he=config.he, raw_he={}, site_dp=config.site_dp,
                       bit_width=config.secagg.bit_width)


def _privacy_problems(config: FederationConfig) -> list[str]:
    # DP-SGD is calibrated to spend target_epsilon over the run; a smaller ledger budget would
    # stop such a site before the last round.
    short = []
    for site in config.sites:
        privacy = config.privacy_for(site.name)
        if privacy.enabled and privacy.noise_multiplier is None and privacy.budget_epsilon_for(site) < privacy.target_epsilon:
            short.append((site, privacy.budget_epsilon_for(site), privacy.target_epsilon))
    if not short:
        return []
    privacy = config.privacy
    if privacy.budget_epsilon is not None and all(s.epsilon_budget is None and s.target_epsilon is None for s, _, _ in short):
        return [f"[privacy] budget_epsilon = {privacy.budget_epsilon:g} is below target_epsilon = "
                f"{privacy.target_epsilon:g}: the training is calibrated to spend target_epsilon, so every ledger "
                "would stop the run before its last round; raise budget_epsilon or lower target_epsilon"]
    targets = {target for _, _, target in short}
    listed = ", ".join(f"{s.name} ({budget:g})" for s, budget, _ in short)
    below = f"target_epsilon = {targets.pop():g}" if len(targets) == 1 else "their target_epsilon"
    return [f"[[sites]] epsilon_budget of {listed} is below {below}: the training is "
            "calibrated to spend target_epsilon, so these ledgers would stop the run before its last round; "
            "raise their epsilon_budget or lower target_epsilon"]


def _site_dp_problems(config: FederationConfig) -> list[str]:
    if not config.site_dp.enabled:
        return []
    problems = []
    if config.federation.aggregation is Aggregation.PLAIN:
        problems.append("[site_dp] mode = \"distributed\" needs aggregation = \"secagg\" or \"he\" (each site's "
                        "share of the noise is too small to be seen on its own), got \"plain\"")
    if not config.privacy.enabled:
        problems.append("[site_dp] mode = \"distributed\" needs [privacy] enabled = true: the sites' ledgers "
                        "and their budgets are set there")
    return problems


def validate(config: FederationConfig) -> None:
    """Check what spans sections, without loading data: the data source for these sites, the
    model for the task, secure aggregation for the cohort size, and the privacy budgets.

    Raises :class:`ConfigError` listing every problem. Checks that need the loaded data (a
    budget too small for one round, a model that does not fit) happen when a run starts.
    """
    from securefed.data import data_problems

    problems = prefixed("[data]", data_problems(config.data, sites=config.site_names()))
    problems += _model_problems(config)
    problems += _secagg_problems(config)
    problems += _he_problems(config)
    problems += _privacy_problems(config)
    problems += _site_dp_problems(config)
    if problems:
        raise ConfigError(problems)
