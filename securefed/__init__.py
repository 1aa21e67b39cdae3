"""securefed: privacy-preserving federated learning for medical imaging.

The public surface is small: secure aggregation (:func:`secure_sum`, :class:`SecAggConfig`),
the error hierarchy (:mod:`securefed.errors`), and the layers below for those who need them
(:mod:`securefed.secagg` for the protocol state machines, :mod:`securefed.primitives` for the
low-level cryptography).
"""

from securefed import errors
from securefed.secagg import SecAggConfig, SecureSumResult, secure_sum

__version__ = "0.1.0"

__all__ = ["SecAggConfig", "SecureSumResult", "errors", "secure_sum", "__version__"]
