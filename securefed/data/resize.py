"""Linear resizing of channel-first images and volumes in numpy (no torch, no scipy).

Each spatial axis is resampled in turn by linear interpolation between the two nearest source
pixels, with pixel centres aligned (``align_corners=False`` in PyTorch terms). Shrinking by a
large factor aliases a little, which is acceptable for bringing data sets to a common size.
"""

from __future__ import annotations

import numpy as np

__all__ = ["resize_linear"]


def _resize_axis(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    old = array.shape[axis]
    if old == size:
        return array
    centres = (np.arange(size, dtype=np.float64) + 0.5) * (old / size) - 0.5
    centres = np.clip(centres, 0, old - 1)
    low = np.floor(centres).astype(np.int64)
    high = np.minimum(low + 1, old - 1)
    weight_shape = [1] * array.ndim
    weight_shape[axis] = size
    weight = (centres - low).reshape(weight_shape).astype(np.float32)
    return np.take(array, low, axis=axis) * (1 - weight) + np.take(array, high, axis=axis) * weight


def resize_linear(array: np.ndarray, size: int, *, spatial_dims: int) -> np.ndarray:
    """Resize the last ``spatial_dims`` axes of float ``array`` to ``size`` each (float32)."""
    out = np.asarray(array, dtype=np.float32)
    for axis in range(out.ndim - spatial_dims, out.ndim):
        out = _resize_axis(out, axis, size)
    return out.astype(np.float32, copy=False)
