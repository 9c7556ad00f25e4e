"""LoRA recovery fine-tuning that keeps the sparsity mask (docs/finetune.md#defaults; the paper's ``main_lora.py``).

A LoRA update s·BA is dense: merging it re-densifies a pruned linear, and masking it only after
training ships a model that training never saw. Here every adapted linear computes, in training and
in evaluation, with the effective weight

    W_eff = W + M ⊙ (s·B A),      M = (W ≠ 0),

which equals M ⊙ (W + s·BA) because W is already zero wherever M is. The model trained is therefore
exactly the merged model: merging writes the same W_eff (formed in float32, then cast) into the base
linear, so the zeros stay zeros and the sparsity after merging is the sparsity before, to the weight.

Built on ``peft`` (a masked subclass of its LoRA ``Linear``, registered through LoraConfig's custom
module hook) and a plain training loop rather than the transformers ``Trainer``. The loop is short,
and owning it is what makes a resumed run bit-identical to an uninterrupted one: the data order
comes from (seed, epoch), dropout is re-seeded from (seed, step), the learning rate is a function
of the step, so a checkpoint needs only the adapter, the AdamW state and the loss curve; it also
avoids the Trainer/accelerate layer, which does nothing for a single CPU or GPU.

    from d2prune.finetune import FinetuneConfig, finetune, merge_masked_lora
    report = finetune(model, train_ids, FinetuneConfig(max_steps=100, effective_batch_size=8))
    model = merge_masked_lora(report.model)      # plain transformers model, same zeros

Modules: ``config`` (settings, report), ``masked_lora`` (the layer, merging), ``training`` (the loop),
``checkpoints``, ``adapters`` (adapter folders: save, load, and their loader for ``load_model``), ``plot``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Light (no peft): importing the package registers adapter folders with d2prune.io.models.load_model.
from d2prune.finetune.adapters import ADAPTER_FILE, load_adapter, save_adapter
from d2prune.finetune.config import FinetuneConfig, FinetuneReport
from d2prune.finetune.plot import plot_loss

if TYPE_CHECKING:
    from d2prune.finetune.masked_lora import MaskedLoraLinear, add_masked_lora, masked_modules, merge_masked_lora
    from d2prune.finetune.training import finetune, linear_zeros

# peft is an optional dependency (the ``finetune`` extra): the names that need it load on first use, so
# that importing the package (which every command that loads a model does, for adapter folders) works
# without it, and a missing peft is reported where it is needed.
_NEED_PEFT = {
    "MaskedLoraLinear": "d2prune.finetune.masked_lora",
    "add_masked_lora": "d2prune.finetune.masked_lora",
    "masked_modules": "d2prune.finetune.masked_lora",
    "merge_masked_lora": "d2prune.finetune.masked_lora",
    "finetune": "d2prune.finetune.training",
    "linear_zeros": "d2prune.finetune.training",
}

__all__ = [
    "ADAPTER_FILE",
    "FinetuneConfig",
    "FinetuneReport",
    "MaskedLoraLinear",
    "add_masked_lora",
    "finetune",
    "linear_zeros",
    "load_adapter",
    "masked_modules",
    "merge_masked_lora",
    "plot_loss",
    "save_adapter",
]


def __getattr__(name: str) -> Any:
    """Import a name that needs peft on first use (PEP 562)."""
    module = _NEED_PEFT.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NEED_PEFT))
