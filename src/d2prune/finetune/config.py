"""Fine-tuning settings and what a run reports."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from d2prune.errors import UserError


@dataclass
class FinetuneConfig:
    """LoRA hyper-parameters and the training schedule. Defaults follow Wanda's recipe (docs/finetune.md#defaults).

    ``effective_batch_size`` blocks make one optimizer step (``batch_size`` per forward, the rest by
    gradient accumulation). ``max_steps`` (optimizer steps) overrides ``epochs``. The learning rate
    warms up linearly over ``warmup_steps``, then decays linearly towards 0 at the last step.
    """

    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: float = 1e-4
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    effective_batch_size: int = 128
    warmup_steps: int = 5
    weight_decay: float = 0.0
    save_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    # The dtype of the frozen weights during training (``d2prune.engine.precision``; the adapters
    # stay float32): "model", "float32", "bfloat16", "float16" or "auto".
    compute_dtype: str = "model"
    progress: bool = True

    def __post_init__(self) -> None:
        from d2prune.engine.precision import check_compute_dtype

        self.compute_dtype = check_compute_dtype(self.compute_dtype)
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t for t in self.lora_targets.split(",") if t.strip()]
        self.lora_targets = [t.strip() for t in self.lora_targets]
        if not self.lora_targets:
            raise UserError("--lora-targets names no module")
        ints = {
            "lora_r": self.lora_r,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "effective_batch_size": self.effective_batch_size,
        }
        if self.max_steps is not None:
            ints["max_steps"] = self.max_steps
        if self.save_steps is not None:
            ints["save_steps"] = self.save_steps
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.effective_batch_size % self.batch_size:
            raise UserError(
                f"effective batch size {self.effective_batch_size} is not a multiple of batch size {self.batch_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_alpha > 0:
            raise UserError(f"LoRA alpha must be positive, got {self.lora_alpha}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise UserError("warmup steps and weight decay must not be negative")

    @property
    def grad_accum(self) -> int:
        return self.effective_batch_size // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "grad_accum": self.grad_accum}

    def trajectory_key(self) -> dict[str, Any]:
        """The fields that change the trained weights (what a resumed run must share)."""
        d = self.to_dict()
        for k in ("save_steps", "device", "progress"):
            d.pop(k)
        if d["compute_dtype"] == "model":  # the keys of runs from before the option existed stay valid
            d.pop("compute_dtype")
        return d


@dataclass
class FinetuneReport:
    """What ``finetune`` did. ``model`` is the PeftModel with the masked adapters, not merged."""

    model: Any
    config: dict[str, Any]
    steps: int
    start_step: int
    steps_per_epoch: int
    epochs: float
    n_blocks: int
    block_size: int
    blocks_seen: int
    tokens_seen: int
    loss_curve: list[dict[str, float]]
    masked_linears: dict[str, float]
    dense_targets: list[str]
    zeros: int
    weights: int
    train_seconds: float
    resumed_from: str | None = None
    checkpoint: str | None = None

    @property
    def overall_sparsity(self) -> float:
        """Zeros over all decoder-stack linears before fine-tuning (as the prune report counts them)."""
        return self.zeros / max(self.weights, 1)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        d["overall_sparsity"] = self.overall_sparsity
        return d
