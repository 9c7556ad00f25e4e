"""The run-level pruning config: what to prune and how; serializes to JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from d2prune.engine.activations import check_mode
from d2prune.engine.precision import check_compute_dtype
from d2prune.errors import UserError
from d2prune.methods import MethodConfig, method_config
from d2prune.patterns import Pattern, SparsityTarget

REFITS = ("cg", "none")


@dataclass
class PruneConfig:
    """What to prune and how. ``method`` is a registry name or a method config dataclass.

    For N:M patterns the sparsity is N/M and ``sparsity`` is ignored. ``layer_sparsities`` gives
    one sparsity per decoder layer (unstructured only) and overrides ``sparsity``.
    """

    method: str | MethodConfig = "d2prune"
    sparsity: float = 0.5
    pattern: str | Pattern = "unstructured"
    layer_sparsities: list[float] | None = None
    sparsity_profile: str = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    device: str = "cpu"
    # The dtype layer forwards run in (``engine.precision``): "model" (the model's own), "float32",
    # "bfloat16", "float16", or "auto" (bfloat16 where the device computes it fast). The weights the
    # methods update, and what is saved, keep the model's dtype.
    compute_dtype: str = "model"
    batch_size: int = 1
    measure_error: bool = True
    progress: bool = True
    # Calibration activations: "ram" (on the compute device), "disk" (memory-mapped files in
    # ``activation_dir``, a temporary folder if None) or "auto" (disk when both buffers would take
    # more than ``offload_threshold`` of the available memory).
    activation_offload: str = "auto"
    activation_dir: str | None = None
    offload_threshold: float = 0.5
    # After each linear's mask is chosen, solve the least squares on that support exactly ("cg":
    # batched Jacobi-PCG on the damped Hessian, at most ``refit_iters`` iterations, to a relative
    # residual of ``refit_tol``), for every pruner whose ``refit_allowed`` is set. "none": off.
    refit: str = "none"
    refit_iters: int = 100
    refit_tol: float = 1e-6
    refit_percdamp: float = 0.01

    def __post_init__(self) -> None:
        self.method = method_config(self.method)
        self.pattern = Pattern.parse(self.pattern)
        for p in [self.sparsity, *(self.layer_sparsities or [])]:
            if not 0 <= p < 1:
                raise UserError(f"sparsity must be in [0, 1), got {p}")
        if self.layer_sparsities is not None and self.pattern.is_nm:
            raise UserError("per-layer sparsities apply to unstructured pruning only, not to N:M")
        if self.sparsity_profile not in ("uniform", "owl"):
            raise UserError(f"unknown sparsity profile {self.sparsity_profile!r}: choose uniform or owl")
        if self.sparsity_profile == "owl":
            if self.pattern.is_nm or self.layer_sparsities is not None:
                raise UserError(
                    "the OWL profile sets per-layer unstructured sparsities; it cannot combine with N:M or explicit ones"
                )
            if not 0 <= self.owl_lambda < 0.5 or self.owl_m <= 0:
                raise UserError(f"OWL needs 0 <= lambda < 0.5 and M > 0, got lambda={self.owl_lambda}, M={self.owl_m}")
        self.compute_dtype = check_compute_dtype(self.compute_dtype)
        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")
        check_mode(self.activation_offload)
        if not 0 < self.offload_threshold:
            raise UserError(
                f"the offload threshold is a fraction of the available memory (> 0), got {self.offload_threshold}"
            )
        if self.refit not in REFITS:
            raise UserError(f"unknown refit {self.refit!r}: choose one of {', '.join(REFITS)}")
        if self.refit_iters < 1 or not self.refit_tol >= 0 or not self.refit_percdamp >= 0:
            raise UserError(
                f"the refit needs iterations >= 1, tol >= 0 and percdamp >= 0, got {self.refit_iters}, "
                f"{self.refit_tol}, {self.refit_percdamp}"
            )
        if self.refit == "none" and self.method.requires_refit():
            raise UserError("refitting the target layers (--refit-target-layers) needs --refit cg")

    def target(self, layer_index: int, num_layers: int) -> SparsityTarget:
        if self.pattern.is_nm:
            return SparsityTarget(self.pattern.sparsity, self.pattern)
        if self.layer_sparsities is not None:
            if len(self.layer_sparsities) != num_layers:
                raise UserError(
                    f"{len(self.layer_sparsities)} per-layer sparsities given for {num_layers} decoder layers"
                )
            return SparsityTarget(self.layer_sparsities[layer_index], self.pattern)
        return SparsityTarget(self.sparsity, self.pattern)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.to_dict(),
            "sparsity": self.pattern.sparsity if self.pattern.is_nm else self.sparsity,
            "pattern": str(self.pattern),
            "layer_sparsities": self.layer_sparsities,
            "sparsity_profile": self.sparsity_profile,
            **({"owl_lambda": self.owl_lambda, "owl_m": self.owl_m} if self.sparsity_profile == "owl" else {}),
            "device": self.device,
            "compute_dtype": self.compute_dtype,
            "batch_size": self.batch_size,
            "measure_error": self.measure_error,
            "activation_offload": self.activation_offload,
            "offload_threshold": self.offload_threshold,
            # Only when on, so the records of runs without a refit stay as they were.
            **(
                {
                    "refit": self.refit,
                    "refit_iters": self.refit_iters,
                    "refit_tol": self.refit_tol,
                    "refit_percdamp": self.refit_percdamp,
                }
                if self.refit != "none"
                else {}
            ),
        }
