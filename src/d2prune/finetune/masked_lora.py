"""The masked LoRA layer: a peft LoRA ``Linear`` whose update never touches a pruned weight.

Every adapted linear computes, in training and in evaluation, with W + M ⊙ (s·B A), M = (W ≠ 0), and
merging writes exactly that weight, so the zeros stay zeros (see :mod:`d2prune.finetune`). W is the
(out, in) matrix (``engine.architecture.weight_matrix``): GPT-2's Conv1D stores it transposed, and
is merged back in its own layout.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from d2prune.engine.architecture import as_stored, is_conv1d, weight_matrix
from d2prune.errors import UserError
from d2prune.finetune.config import FinetuneConfig


def _smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.tiny * info.eps


class MaskedLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` with the effective weight W + M ⊙ (s·BA), M = (W ≠ 0) at construction.

    A linear with no zero weight gets no mask and behaves as plain LoRA. Merging writes exactly the
    weight the forward uses, and so does the eval-mode forward, so adapter and merged model agree.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, *args, **kwargs)
        # peft's own Conv1D path (which a custom module bypasses) sets this from the layer; peft's
        # helpers read it. Our weights are always handled as (out, in) below.
        self.fan_in_fan_out = is_conv1d(self.get_base_layer())
        keep = weight_matrix(self.get_base_layer()) != 0
        self.register_buffer("sparsity_mask", None if bool(keep.all()) else keep, persistent=False)

    def masked_delta(self, adapter: str) -> torch.Tensor:
        """M ⊙ (s·B A) in the adapter's dtype (float32 unless the adapter was cast)."""
        delta = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]
        if self.sparsity_mask is not None:
            # where, not a product: an inf/nan delta must not leak into a pruned position.
            delta = torch.where(self.sparsity_mask, delta, 0.0)
        return delta

    def merged_weight(self, adapter: str) -> torch.Tensor:
        """W + M ⊙ (s·BA) as (out, in), summed in float32 and cast to W's dtype; kept weights never become 0."""
        weight = weight_matrix(self.get_base_layer())
        merged = (weight.float() + self.masked_delta(adapter).float()).to(weight.dtype)
        if self.sparsity_mask is not None:
            # A kept weight that lands exactly on 0 would change the mask (and the sparsity):
            # give it the smallest subnormal instead, a change far below rounding.
            hit = self.sparsity_mask & (merged == 0)
            if bool(hit.any()):
                merged = torch.where(hit, torch.full_like(merged, _smallest_subnormal(weight.dtype)), merged)
        return merged

    def get_delta_weight(self, adapter: str) -> torch.Tensor:  # used by peft's unmerge: the stored layout
        base = self.get_base_layer()
        return as_stored(base, self.masked_delta(adapter)).to(base.weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            merged = self.merged_weight(adapter)
            if not torch.isfinite(merged).all():
                raise ValueError(f"non-finite weights after merging adapter {adapter!r}: the adapter diverged")
            base = self.get_base_layer()
            base.weight.data = as_stored(base, merged).contiguous()
            self.merged_adapters.append(adapter)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not adapters:
            return super().forward(x, *args, **kwargs)  # the base linear alone (merged: already masked)
        if kwargs.get("adapter_names") is not None:
            raise NotImplementedError("mixed-adapter batches are not supported by masked LoRA")
        base = self.get_base_layer()
        if len(adapters) == 1 and (not self.training or isinstance(self.lora_dropout[adapters[0]], nn.Identity)):
            # No dropout: one matmul with the very weight merging will write.
            return F.linear(x, self.merged_weight(adapters[0]), base.bias)
        result = base(x)
        for adapter in adapters:  # LoRA dropout acts on the adapter's input only, as in peft
            delta = self.masked_delta(adapter)
            result = result + F.linear(self.lora_dropout[adapter](self._cast_input_dtype(x, delta.dtype)), delta)
        return result.to(x.dtype)

    def __repr__(self) -> str:
        return "masked_" + super().__repr__()


def _lora_config(config: FinetuneConfig):
    from peft import LoraConfig

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    register_masked(lora)
    return lora


def _adaptable_classes() -> tuple[type, ...]:
    """The linear classes peft can adapt: nn.Linear and transformers' Conv1D (not a model's own copy)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def register_masked(lora_config) -> None:
    """Make every nn.Linear (and GPT-2 Conv1D) that ``lora_config`` targets a MaskedLoraLinear."""
    # peft's hook for custom LoRA layers: every targeted linear becomes a MaskedLoraLinear.
    lora_config._register_custom_module(dict.fromkeys(_adaptable_classes(), MaskedLoraLinear))


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """Each target must name at least one linear (as peft matches: the name or its last parts)."""
    linears = {n for n, m in model.named_modules() if isinstance(m, _adaptable_classes())}
    names = [n for n, _ in model.named_modules()]
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise UserError(f"LoRA target {t!r} matches no module; the model's linears are named {', '.join(short)}")
        bad = [n for n in hits if n not in linears]
        if bad:
            raise UserError(
                f"LoRA target {t!r} matches {bad[0]}, which is not a linear layer (only linears are adapted)"
            )


def masked_modules(model: nn.Module) -> dict[str, MaskedLoraLinear]:
    """The masked LoRA layers of a PeftModel, by their name in the base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {n: m for n, m in base.named_modules() if isinstance(m, MaskedLoraLinear)}


def add_masked_lora(model: nn.Module, config: FinetuneConfig):
    """Wrap ``model`` (in place) with masked LoRA adapters; returns the PeftModel. Seeded by ``config.seed``."""
    from peft import get_peft_model

    _check_targets(model, config.lora_targets)
    with torch.random.fork_rng(devices=[]), quiet_peft():
        torch.manual_seed(config.seed)  # A's random init
        return get_peft_model(model, _lora_config(config))


@contextlib.contextmanager
def quiet_peft():
    """Silence a peft warning that is not ours to act on."""
    # peft 0.21 still calls a transformers 5 method that warns of its own rename.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def merge_masked_lora(peft_model) -> nn.Module:
    """Merge the masked adapters exactly into the base linears; returns the plain transformers model.

    Raises RuntimeError if a pruned position is not zero afterwards (that would be a bug here).
    """
    masks = {n: m.sparsity_mask.clone() for n, m in masked_modules(peft_model).items() if m.sparsity_mask is not None}
    model = peft_model.merge_and_unload()
    for name, keep in masks.items():
        weight = weight_matrix(model.get_submodule(name))
        if not torch.equal(weight != 0, keep.to(weight.device)):
            raise RuntimeError(f"merging changed the zero pattern of {name}")
    return model
