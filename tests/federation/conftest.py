"""Shared helpers of the federation tests: importable helpers, and one torch thread where asked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; several oversubscribe a small, busy machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
