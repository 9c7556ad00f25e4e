"""Find the decoder-layer stack and the linears of any transformers causal LM by its module tree.

A *linear* here is any module computing x ↦ x Wᵀ + b with a 2-D weight: ``nn.Linear`` (weight stored
(out, in)) and GPT-2-style ``Conv1D`` (weight stored transposed, (in, out), computing x W + b). Code
that reads or writes a linear's weight goes through ``weight_matrix``, which always gives the
(out, in) matrix — a view for Conv1D, so ``copy_`` into it writes the stored weight — and N:M groups,
rows and input channels then mean the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from d2prune.errors import UserError


@dataclass
class DecoderStack:
    """The repeated blocks of a model: ``layers[i]`` lives at ``f"{path}.{i}"``."""

    path: str
    layers: nn.ModuleList

    @property
    def layer_class(self) -> str:
        return type(self.layers[0]).__name__


def find_decoder_stack(model: nn.Module) -> DecoderStack:
    """The largest ``nn.ModuleList`` of blocks of one class that contain linears.

    Inspecting the tree (not the model-type string) is what lets every architecture work.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(block) for block in module}
        if len(classes) != 1 or not find_linears(module[0]):
            continue
        if best is None or len(module) > best[0]:
            best = (len(module), path, module)
    if best is None:
        raise UserError(
            f"cannot find a stack of decoder layers with linear sub-modules in {type(model).__name__}; "
            "this architecture is not supported"
        )
    return DecoderStack(best[1], best[2])


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """All linear sub-modules of ``block`` (``nn.Linear`` and ``Conv1D``) by module-relative name, in
    module order."""
    return {name: m for name, m in block.named_modules() if is_linear(m)}


def is_conv1d(module: nn.Module) -> bool:
    """A GPT-2-style ``Conv1D`` (transformers', or a remote-code copy of it): weight (nx, nf) = (in, out).

    Matched by class name and the weight's shape, not by importing transformers' class, so copies
    of it in models' own code are found too; torch's ``nn.Conv1d`` (a real convolution) is not.
    """
    weight = getattr(module, "weight", None)
    return (
        any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    )


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear that can be pruned: ``nn.Linear`` or ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def as_out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` shaped like ``module.weight`` as stored, seen as (out, in): a transposed view for Conv1D."""
    return tensor.t() if is_conv1d(module) else tensor


def as_stored(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of ``as_out_in``: an (out, in) tensor in the layout ``module.weight`` is stored in."""
    return tensor.t() if is_conv1d(module) else tensor


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a linear, sharing storage with ``module.weight.data`` (writes through)."""
    return as_out_in(module, module.weight.data)


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def out_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[0]


# Names of the fused or separate q/k/v projections that identify the module owning attention.
_QKV_SETS = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("qkv_proj",),
    ("query_key_value",),
    ("c_attn",),
    ("Wqkv",),
    ("qkv",),
)


def owns_qkv(module: nn.Module) -> bool:
    """Whether ``module`` holds the q/k/v projections (separate or fused) as direct children."""
    children = dict(module.named_children())
    return any(all(name in children for name in names) for names in _QKV_SETS)


def is_attention_class(module: nn.Module) -> bool:
    """Whether ``module``'s class name says it is an attention module (and not a norm)."""
    name = type(module).__name__.lower()
    return "attention" in name and "norm" not in name
