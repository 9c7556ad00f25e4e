"""The interface every pruning method implements, and the method registry.

A method sees one linear at a time: it observes batches of (input, output) of that linear and then
prunes its weight. It never sees layers or models; the pipeline owns those.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ..errors import UserError
from ..patterns import SparsityTarget


class Gram:
    """Running sum of X Xᵀ over calibration samples for one linear input.

    Linears that read the same tensor (q/k/v, gate/up) share one Gram, built by the pipeline, so
    the c×c product is paid once per distinct input.
    """

    def __init__(self, width: int, device: torch.device | str):
        self.sum = torch.zeros(width, width, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch ``x`` of shape (batch, tokens, width)."""
        flat = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(flat.t(), flat)
        self.nsamples += x.shape[0] if x.dim() > 2 else 1

    def hessian(self) -> torch.Tensor:
        """SparseGPT's H = (2/N) Σ_k X_k X_kᵀ with N calibration samples (a new tensor)."""
        return self.sum * (2.0 / max(self.nsamples, 1))


class LinearPruner:
    """Statistics and pruning for one linear. Subclasses override ``observe`` and ``prune``."""

    needs_gram: ClassVar[bool] = False
    updates_weights: ClassVar[bool] = False

    def __init__(self, name: str, weight: torch.Tensor):
        self.name = name
        self.rows, self.cols = weight.shape
        self.device = weight.device

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate statistics from input ``x`` (batch, tokens, cols) and output ``y`` (batch, tokens, rows)."""

    def prune(self, weight: torch.Tensor, target: SparsityTarget, gram: Gram | None) -> torch.Tensor:
        """Return the pruned weight (float32, same shape); ``gram`` is set when ``needs_gram``."""
        raise NotImplementedError


@dataclass
class MethodConfig:
    """Base of the per-method config dataclasses; ``name`` is the registry key."""

    name: ClassVar[str] = ""
    # Methods that score with gradients of the LM loss (Pruner-Zero) get them from the pipeline,
    # which runs the model-level gradient pass before layer-wise pruning (see gradients.py).
    needs_gradients: ClassVar[bool] = False

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        """A pruner for the linear ``name`` (module-relative, e.g. ``self_attn.q_proj``) whose full
        module path in the model is ``path`` (e.g. ``model.layers.3.self_attn.q_proj``)."""
        raise NotImplementedError

    def resolve(self, model_info: dict[str, Any]) -> "MethodConfig":
        """Fill options that depend on the model (e.g. D²Prune's auto_s); default: unchanged."""
        return self

    def validate(self, linear_names: list[str], layer_class: str) -> None:
        """Check options that name linears against a decoder layer's linears."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


METHODS: dict[str, type[MethodConfig]] = {}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a method config available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def method_config(name_or_config: str | MethodConfig, **options: Any) -> MethodConfig:
    """A method's config from its registry name (with options) or an existing config."""
    if isinstance(name_or_config, MethodConfig):
        return name_or_config
    key = str(name_or_config).strip().lower()
    if key not in METHODS:
        raise UserError(f"unknown method {name_or_config!r}: choose one of {', '.join(sorted(METHODS))}")
    return METHODS[key](**options)
