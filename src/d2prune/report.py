"""What a prune run returns: one report per pruned linear and the run's report; both serialize to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class LinearReport:
    """One pruned linear: its full module path, achieved vs target sparsity and error."""

    name: str
    layer: int
    target_sparsity: float
    sparsity: float
    relative_error: float | None
    nm_violations: int | None
    weight_update: bool
    seconds: float
    # With a refit: the error of the method's own weights, before the exact least squares on its
    # mask (``relative_error`` is then the error after it). None without one, and not serialized.
    relative_error_before_refit: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["relative_error_before_refit"] is None:
            del d["relative_error_before_refit"]
        return d


@dataclass
class PruneReport:
    config: dict[str, Any]
    linears: list[LinearReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    nsamples: int = 0
    seqlen: int = 0
    zeros: int = 0
    weights: int = 0
    layer_sparsities: list[float] = field(default_factory=list)
    outlier_ratios: list[float] | None = None
    activations: dict[str, Any] | None = None
    resumed_at_layer: int | None = None
    # The dtype the layer forwards ran in: requested, resolved, and why (``engine.precision``).
    compute_dtype: dict[str, str] | None = None
    # Image calibration: (channels, height, width) of the images; ``seqlen`` is then tokens per image.
    image_size: list[int] | None = None

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zeros over all pruned linears, weighted by size."""
        return self.zeros / max(self.weights, 1)

    @property
    def nm_ok(self) -> bool | None:
        checks = [lin.nm_violations for lin in self.linears if lin.nm_violations is not None]
        return None if not checks else all(v == 0 for v in checks)

    def sparsity_record(self) -> dict[str, Any]:
        """What ``sparsity.json`` next to a saved pruned model holds."""
        return {
            "method": self.config["method"]["name"],
            "config": self.config,
            "pattern": self.config["pattern"],
            "overall_sparsity": self.overall_sparsity,
            "linears": {lin.name: lin.sparsity for lin in self.linears},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneReport:
        """A report from ``to_dict``'s output; ``zeros`` and ``weights`` (which it leaves out) come
        from ``d`` where present, so a caller that needs ``overall_sparsity`` back stores them too."""
        own = {f.name for f in fields(cls)} - {"linears"}
        linears = [LinearReport(**lin) for lin in d.get("linears", [])]
        return cls(linears=linears, **{k: v for k, v in d.items() if k in own})

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            **({"image_size": self.image_size} if self.image_size is not None else {}),
            "overall_sparsity": self.overall_sparsity,
            "layer_sparsities": self.layer_sparsities,
            "outlier_ratios": self.outlier_ratios,
            "nm_structure_ok": self.nm_ok,
            "timings": self.timings,
            "compute_dtype": self.compute_dtype,
            "activations": self.activations,
            "resumed_at_layer": self.resumed_at_layer,
            "linears": [lin.to_dict() for lin in self.linears],
        }
