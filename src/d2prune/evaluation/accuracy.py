"""Top-1 and top-5 accuracy (and the mean cross-entropy) of an image classifier on labelled batches
(no method logic here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from d2prune.engine import distributed
from d2prune.engine.precision import as_dtype, computing_in
from d2prune.errors import UserError


@dataclass
class AccuracyResult:
    """Fractions of images whose label is the top logit (top1) or among the top five (top5), and the
    mean cross-entropy of the logits against the labels (loss)."""

    top1: float
    top5: float
    n_images: int
    loss: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_accuracy(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    device: str | torch.device | None = None,
    progress: bool = True,
    compute_dtype: torch.dtype | str | None = None,
) -> AccuracyResult:
    """Top-1 and top-5 accuracy of ``model`` on ``batches`` (dicts with ``pixel_values`` and
    ``labels``, e.g. ``d2prune.data.images.ImageBatches``). With fewer than five classes, top-5 counts
    every class. Ties go to the lower class index (``torch.topk`` on the float32 logits). ``device``
    None: the device of the model's first parameter; ``compute_dtype`` as for ``evaluate_ppl``.

    Under torchrun each rank scores a contiguous share of the batches and the counts are summed.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    world = distributed.current()
    lo, hi = world.bounds(len(batches))
    counts = torch.zeros(4, dtype=torch.float64)  # top-1 hits, top-5 hits, images, summed cross-entropy
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            computing_in(model, as_dtype(compute_dtype, dev)),
            world.sync("computing accuracy"),
            tqdm(total=hi - lo, desc="accuracy", unit="batch", disable=not progress) as bar,
        ):
            for i in range(lo, hi):
                batch = batches[i]
                labels = batch["labels"].to(dev)
                logits = model(pixel_values=batch["pixel_values"].to(dev)).logits.float()
                if int(labels.max()) >= logits.shape[-1] or int(labels.min()) < 0:
                    raise UserError(f"image labels must lie in 0..{logits.shape[-1] - 1} for this model")
                top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                hits = top == labels[:, None]
                loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                counts += torch.tensor([hits[:, 0].sum().item(), hits.any(-1).sum().item(), labels.shape[0], loss])
                bar.update(1)
    finally:
        model.train(was_training)
    world.all_reduce_sum([counts], "summing the accuracy counts")
    n = int(counts[2])
    if n == 0:
        raise UserError("no images to evaluate")
    return AccuracyResult(top1=float(counts[0]) / n, top5=float(counts[1]) / n, n_images=n, loss=float(counts[3]) / n)
