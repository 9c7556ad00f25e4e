"""OWL: outlier-weighted layer-wise sparsity (Yin et al., ICML 2024; docs/methods.md#owl).

A dense layer-by-layer pass computes, per decoder layer, the share of Wanda scores |W|·‖X_j‖ that
exceed ``m`` times their mean (the outlier ratio D_l, in percent). Layers with more outliers get a
lower sparsity: after min–max normalisation of D to [0, 2λ], sparsity_l = p − (D̂_l − mean D̂).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from d2prune.engine.activations import Activations
from d2prune.engine.architecture import find_decoder_stack, find_linears, in_features, weight_matrix
from d2prune.engine.capture import batch_rows, capture_inputs_and_arguments
from d2prune.engine.executor import current_executor
from d2prune.engine.layer import run_layer
from d2prune.engine.walk import LayerStore, layers_in_turn
from d2prune.methods.wanda import InputNormStats


@torch.no_grad()
def outlier_ratios(
    model: nn.Module,
    batches: list[dict],
    m: float,
    device: torch.device,
    progress: bool = True,
    store: LayerStore | None = None,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """Per decoder layer: 100 × fraction of the layer's Wanda scores above ``m`` × their mean.

    Each layer sees the dense outputs of the layers before it (nothing is pruned here). ``store``
    says where the layers live; default: in ``model``. ``dtype``: the forwards' (None: the model's). Under ``torchrun`` each rank runs its share
    of the batches and the norms are summed over ranks.
    """
    executor = current_executor()
    store = store or LayerStore()
    stack = find_decoder_stack(model)
    local = executor.shard(batches)  # [distributed]
    # Always in memory: this dense pass is not resumable, and its buffers are freed at the end.
    acts = Activations("ram", device)
    with executor.sync("capturing the layer-0 inputs for OWL"), store.outside_stack(device):
        _, layer_extras = capture_inputs_and_arguments(model, stack, local, device, acts, dtype=dtype)
    sizes = [batch_rows(b) for b in local]
    ratios = []
    turns = layers_in_turn(
        stack,
        store,
        acts,
        range(len(stack.layers)),
        device,
        progress=progress,
        desc="OWL outlier ratios",
        sync=executor.sync,
    )
    for index, layer in turns:
        linears = find_linears(layer)
        stats = {name: InputNormStats(in_features(lin), device) for name, lin in linears.items()}
        handles = [
            lin.register_forward_hook(lambda mod, inp, out, s=stats[name]: s.add(inp[0]))
            for name, lin in linears.items()
        ]
        try:
            with executor.sync(f"the OWL statistics pass of layer {index}"):
                run_layer(layer, acts.inps, layer_extras[index], sizes, acts.outs, dtype=dtype)
        finally:
            for h in handles:
                h.remove()
        executor.reduce_statistics(stats.values(), "OWL input norms")  # [distributed]
        scores = torch.cat(
            [(weight_matrix(lin).float().abs() * stats[name].sq_norm.sqrt()).flatten() for name, lin in linears.items()]
        )
        ratios.append(float((scores > m * scores.mean()).float().mean()) * 100)
    acts.close()
    return ratios


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Map outlier ratios to per-layer sparsities with mean ``sparsity`` inside [p − λ, p + λ].

    OWL's own mapping spans 2λ around the mean but can leave the band when the ratios are skewed
    (e.g. one outlier layer); we then shift-and-clip: find t with mean(clip(s + t)) = p by bisection,
    which keeps OWL's ordering and its gaps between the layers that are not clipped.
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    raw = sparsity - (scaled - scaled.mean())
    lo, hi = max(sparsity - lam, 0.0), min(sparsity + lam, 1.0 - 1e-6)
    if raw.min() >= lo and raw.max() <= hi:
        return raw.tolist()
    a, b = lo - float(raw.max()), hi - float(raw.min())  # clip(raw + a) = lo, clip(raw + b) = hi
    for _ in range(200):
        t = (a + b) / 2
        if float((raw + t).clamp(lo, hi).mean()) < sparsity:
            a = t
        else:
            b = t
    return (raw + (a + b) / 2).clamp(lo, hi).tolist()
