"""The five stages of a secure-aggregation round and the order they must come in."""

from __future__ import annotations

import enum

from securefed.errors import ConfigError

__all__ = ["Stage", "ALLOWED_TRANSITIONS", "parse_stage"]


class Stage(enum.Enum):
    """A stage is named after what the clients send in it (Bonawitz et al. 2017, rounds 0-4)."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"

    def next(self) -> Stage | None:
        order = list(Stage)
        i = order.index(self)
        return order[i + 1] if i + 1 < len(order) else None


# The only moves a party may make: into the first stage from nothing, then one step at a time.
ALLOWED_TRANSITIONS: frozenset[tuple[Stage | None, Stage]] = frozenset(
    [(None, Stage.ADVERTISE_KEYS)]
    + [(s, nxt) for s in Stage if (nxt := s.next()) is not None]
)


def parse_stage(value: Stage | str) -> Stage:
    if isinstance(value, Stage):
        return value
    try:
        return Stage(value)
    except ValueError:
        names = ", ".join(s.value for s in Stage)
        raise ConfigError(f"unknown stage {value!r}; the stages are: {names}") from None
