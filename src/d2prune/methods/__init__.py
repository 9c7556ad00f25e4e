"""Pruning methods, one module each; importing this package registers them all."""

from .base import METHODS, Gram, LinearPruner, MethodConfig, Statistic, method_config, register
from .d2prune import D2PruneConfig
from .magnitude import MagnitudeConfig
from .pruner_zero import PrunerZeroConfig
from .ria import RIAConfig
from .sparsegpt import SparseGPTConfig
from .wanda import WandaConfig

__all__ = [
    "METHODS",
    "Gram",
    "LinearPruner",
    "MethodConfig",
    "Statistic",
    "method_config",
    "register",
    "D2PruneConfig",
    "MagnitudeConfig",
    "PrunerZeroConfig",
    "RIAConfig",
    "SparseGPTConfig",
    "WandaConfig",
]
