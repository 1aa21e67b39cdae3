"""Secure aggregation (SecAgg+): the coordinator learns the sum of the sites' inputs, nothing else.

Bonawitz et al. (CCS 2017) with the sparse neighbour graph of Bell et al. (CCS 2020). The
protocol core is two pure state machines, :class:`SecAggClient` and :class:`SecAggServer`,
exchanging immutable messages with a versioned byte encoding; :func:`secure_sum` runs a whole
round in process. See :mod:`securefed.secagg.params` for how the default neighbourhood size and
threshold are chosen, and :mod:`securefed.secagg.attacks` for scripted malicious coordinators.
"""

from securefed.secagg import attacks
from securefed.secagg.client import ClientState, SecAggClient
from securefed.secagg.config import RoundConfig, SecAggConfig
from securefed.secagg.messages import decode_message
from securefed.secagg.params import ParameterChoice, choose_parameters
from securefed.secagg.modular import ModularInput
from securefed.secagg.recipes import (
    CoordinatorView,
    ModularSumResult,
    ReceivedMessage,
    SecureSumResult,
    secure_modular_sum,
    secure_sum,
)
from securefed.secagg.server import AggregateResult, SecAggServer
from securefed.secagg.stages import Stage

__all__ = [
    "AggregateResult",
    "ClientState",
    "CoordinatorView",
    "ModularInput",
    "ModularSumResult",
    "ParameterChoice",
    "ReceivedMessage",
    "RoundConfig",
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "SecureSumResult",
    "Stage",
    "attacks",
    "choose_parameters",
    "decode_message",
    "secure_modular_sum",
    "secure_sum",
]
