"""d2prune: one-shot post-training pruning of Hugging Face causal LMs.

import d2prune
report = d2prune.prune(model, calibration_ids, d2prune.PruneConfig(method="d2prune", sparsity=0.5))
"""

from d2prune.api import prune
from d2prune.config import PruneConfig
from d2prune.errors import UserError
from d2prune.io.sparse_load import load_pretrained
from d2prune.methods import (
    METHODS,
    ALPSConfig,
    D2ALPSConfig,
    D2PruneConfig,
    DSnoTConfig,
    MagnitudeConfig,
    MethodConfig,
    PrunerZeroConfig,
    RIAConfig,
    SparseGPTConfig,
    WandaConfig,
)
from d2prune.patterns import Pattern, SparsityTarget
from d2prune.report import LinearReport, PruneReport

__version__ = "0.1.0"

__all__ = [
    "prune",
    "PruneConfig",
    "PruneReport",
    "LinearReport",
    "UserError",
    "load_pretrained",
    "METHODS",
    "MethodConfig",
    "ALPSConfig",
    "D2ALPSConfig",
    "D2PruneConfig",
    "DSnoTConfig",
    "MagnitudeConfig",
    "PrunerZeroConfig",
    "RIAConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "Pattern",
    "SparsityTarget",
]
