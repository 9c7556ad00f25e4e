"""Pruning methods, one module each; importing this package registers them all."""

from .alps import ALPSConfig
from .base import METHODS, Gram, LinearPruner, MethodConfig, Statistic, method_config, register
from .d2alps import D2ALPSConfig
from .d2prune import D2PruneConfig
from .dsnot import DSnoTConfig
from .magnitude import MagnitudeConfig
from .pruner_zero import PrunerZeroConfig
from .ria import RIAConfig
from .sparsegpt import SparseGPTConfig
from .wanda import WandaConfig

__all__ = [
    "ALPSConfig",
    "D2ALPSConfig",
    "METHODS",
    "Gram",
    "LinearPruner",
    "MethodConfig",
    "Statistic",
    "method_config",
    "register",
    "D2PruneConfig",
    "DSnoTConfig",
    "MagnitudeConfig",
    "PrunerZeroConfig",
    "RIAConfig",
    "SparseGPTConfig",
    "WandaConfig",
]
