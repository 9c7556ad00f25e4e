"""Find the decoder-layer stack and the linears of any transformers causal LM by its module tree."""

from __future__ import annotations

from dataclasses import dataclass

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


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` sub-modules of ``block`` by module-relative name, in module order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


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
