"""Inputs that arrive already encoded in Z_(2^b).

The fixed-point path (``SecAggClient(vector=floats)``) clips, scales and rounds for the caller.
Mechanisms that do their own integer encoding — the distributed discrete Gaussian of
``securefed.privacy.distributed``, which rotates, rounds and adds integer noise before masking —
hand the protocol a :class:`ModularInput` instead: its values are summed modulo 2^b exactly as
given, and the caller decodes the coordinator's ``AggregateResult.raw`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from securefed.errors import ConfigError

__all__ = ["ModularInput"]

_DTYPES = {32: np.uint32, 64: np.uint64}


@dataclass(frozen=True, eq=False)
class ModularInput:
    """A site's input as elements of Z_(2^bit_width): np.uint32 for 32 bits, np.uint64 for 64."""

    values: np.ndarray

    def __post_init__(self) -> None:
        values = self.values
        if not isinstance(values, np.ndarray) or values.dtype not in (np.uint32, np.uint64) or values.ndim != 1:
            raise ConfigError(
                "a ModularInput holds a 1-D np.uint32 (32-bit ring) or np.uint64 (64-bit ring) array, got "
                f"{getattr(values, 'dtype', type(values).__name__)} with shape {np.shape(values)}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def check_ring(self, bit_width: int) -> list[str]:
        """Problems if these values do not live in the round's ring."""
        if self.values.dtype != _DTYPES.get(bit_width):
            return [f"the encoded input is {self.values.dtype}, the round's {bit_width}-bit ring needs "
                    f"{np.dtype(_DTYPES[bit_width]).name if bit_width in _DTYPES else 'uint32 or uint64'}"]
        return []
