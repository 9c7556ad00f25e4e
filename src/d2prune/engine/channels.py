"""Permuting a linear's input channels exactly, together with the linears that produce them.

A permutation of a linear's input columns leaves the model's function unchanged only if whatever
produces that input is permuted the same way. Here that is done where it is exact and cheap: a
*consumer* linear whose input is an elementwise function of the outputs of *producer* linears
(LLaMA ``mlp.down_proj`` ← ``mlp.gate_proj``, ``mlp.up_proj``; OPT ``fc2`` ← ``fc1``; GPT-NeoX
``dense_4h_to_h`` ← ``dense_h_to_4h``). The producers' output rows (and biases) and the consumer's
input columns are permuted physically, so the stored model computes the same function and an N:M
pattern chosen in the permuted order holds in stored order.

Rule for producers of a consumer: linears with the same parent module, ``out_features`` equal to
the consumer's ``in_features``, that ran before it in the forward pass; the parent must not be (or
sit inside) an attention module, whose head structure and softmax mix channels (q/k/v → o_proj is
*not* elementwise). Linears whose input comes from a norm or from attention (q/k/v/o, gate/up) get
no producers and are never permuted. Fused projections (Phi-3 ``gate_up_proj``, width 2×) do not
match the width rule, so their consumer is not permuted either.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from d2prune.engine.architecture import in_features, is_attention_class, out_features, owns_qkv, weight_matrix


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def find_producers(layer: nn.Module, linears: dict[str, nn.Module], call_order: list[str]) -> dict[str, list[str]]:
    """``{consumer: [producers]}`` for the linears of ``layer`` (module-relative names) whose input
    channels can be permuted exactly; ``call_order``: the linears in the order the forward ran them."""
    modules = dict(layer.named_modules())
    rank = {name: i for i, name in enumerate(call_order)}

    def in_attention(path: str) -> bool:
        parts = path.split(".") if path else []
        for k in range(len(parts) + 1):
            module = modules.get(".".join(parts[:k]))
            if k and module is not None and (is_attention_class(module) or owns_qkv(module)):
                return True
        # The layer itself owning q/k/v (no attention sub-module) also disqualifies its direct children.
        return not parts and owns_qkv(layer)

    found: dict[str, list[str]] = {}
    for name, lin in linears.items():
        parent = _parent(name)
        if name not in rank or in_attention(parent):
            continue
        producers = [
            other
            for other, o in linears.items()
            if other != name
            and _parent(other) == parent
            and out_features(o) == in_features(lin)
            and other in rank
            and rank[other] < rank[name]
        ]
        if producers:
            found[name] = producers
    return found


@torch.no_grad()
def permute_channels(consumer: nn.Module, producers: list[nn.Module], perm: torch.Tensor) -> None:
    """In place: consumer input column k ← old column ``perm[k]``; producer output row (and bias) k ← old ``perm[k]``."""
    # Copied into the existing tensors: stores and hooks that hold them keep seeing the live weights.
    # (out, in) views (Conv1D's transposed): indexing makes a copy, so copy_ back is safe.
    w = weight_matrix(consumer)
    w.copy_(w[:, perm.to(w.device)])
    for lin in producers:
        pw = weight_matrix(lin)
        idx = perm.to(pw.device)
        pw.copy_(pw[idx])
        if lin.bias is not None:
            lin.bias.data.copy_(lin.bias.data[idx])
