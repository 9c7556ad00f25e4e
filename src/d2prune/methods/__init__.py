"""Pruning methods, one module each; importing this package registers them all."""

from d2prune.methods.alps import ALPSConfig
from d2prune.methods.base import METHODS, Gram, LinearPruner, MethodConfig, Statistic, method_config, register
from d2prune.methods.d2alps import D2ALPSConfig
from d2prune.methods.d2prune import D2PruneConfig
from d2prune.methods.dsnot import DSnoTConfig
from d2prune.methods.magnitude import MagnitudeConfig
from d2prune.methods.pruner_zero import PrunerZeroConfig
from d2prune.methods.ria import RIAConfig
from d2prune.methods.sparsegpt import SparseGPTConfig
from d2prune.methods.wanda import WandaConfig

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
