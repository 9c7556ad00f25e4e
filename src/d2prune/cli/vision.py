"""What ``d2prune prune`` and ``d2prune eval`` do differently for an image classifier (ViT, DeiT),
told from the model's config: calibration images from an image folder (``--calib DIR``), top-1/top-5
accuracy on a labelled image folder (``--eval-images DIR``) instead of perplexity, and the options
that only make sense for a causal LM refused in one line."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from d2prune.engine import distributed
from d2prune.errors import UserError

DEFAULT_EVAL = ["wikitext2"]  # --eval's default: text sets, skipped for an image classifier


def model_config(model: Any) -> Any:
    """The config of a model in memory, or of the folder of one streamed from disk."""
    if isinstance(model, Path):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model))
    return model.config


def check_options(args: argparse.Namespace, config=None) -> None:
    """Refuse what an image classifier cannot do: text perplexity sets, zero-shot tasks, text options
    of the method."""
    if args.eval and [e.lower() for e in args.eval] not in (DEFAULT_EVAL, ["none"]):
        raise UserError(
            f"--eval {' '.join(args.eval)}: perplexity sets are for causal LMs; evaluate an image classifier "
            "with --eval-images IMAGE_FOLDER"
        )
    if args.eval_data_path:
        raise UserError("--eval-data-path names text; evaluate an image classifier with --eval-images IMAGE_FOLDER")
    if args.zero_shot:
        raise UserError("--zero-shot runs language tasks; it cannot evaluate an image classifier")
    if config is None:
        return
    from d2prune.cli.method_options import text_sources

    for _, what, source in text_sources(args, config.method):
        raise UserError(f"the {what} source {source} is text; an image classifier takes images (--calib IMAGE_FOLDER)")


def check_images_only(args: argparse.Namespace) -> None:
    """--eval-images given for a causal LM."""
    if getattr(args, "eval_images", None):
        raise UserError("--eval-images measures an image classifier's accuracy; this model is a causal LM")


def _labels(model: Any) -> dict[str, Any]:
    """The model's ``label2id`` and ``num_labels``, which index and check an image folder's classes."""
    config = model_config(model)
    return {"label2id": getattr(config, "label2id", None), "num_labels": getattr(config, "num_labels", None)}


def calibration(args: argparse.Namespace, model: Any, processor: Any, source: str) -> dict:
    """``--nsamples`` images drawn with ``--seed`` from the image folder ``source`` (ImageNet layout)."""
    from d2prune.data.images import get_image_calibration

    if not Path(source).expanduser().is_dir():
        raise UserError(
            f"an image classifier calibrates on images: pass --calib IMAGE_FOLDER (class sub-folders of images), "
            f"not {source!r}"
        )
    with distributed.current().sync("reading the calibration images"):
        return get_image_calibration(processor, source, nsamples=args.nsamples, seed=args.seed, **_labels(model))


def heldout(args: argparse.Namespace, model: Any, processor: Any, source: str) -> dict:
    """``--heldout-windows`` images of the folder ``source`` that the calibration draw did not pick,
    drawn with ``--heldout-seed`` (for a held-out choice such as ``--target-layers auto``)."""
    from d2prune.data.images import get_image_heldout

    if not Path(source).expanduser().is_dir():
        raise UserError(f"held-out images come from an image folder (--heldout-source DIR), not {source!r}")
    with distributed.current().sync("reading the held-out images"):
        return get_image_heldout(
            processor,
            source,
            nsamples=args.heldout_windows,
            calib_nsamples=args.nsamples,
            calib_seed=args.seed,
            seed=args.heldout_seed,
            **_labels(model),
        )


def in_memory(args: argparse.Namespace, model: Any) -> Any:
    """The model to evaluate in memory: itself, or the folder a streamed run wrote, loaded (image
    classifiers are small enough to be evaluated whole)."""
    if not isinstance(model, Path):
        return model
    from d2prune.io.models import load_model

    return load_model(str(model), dtype=args.dtype, device="cpu")[0]


def evaluate(model: Any, processor: Any, args: argparse.Namespace, label: str, results: dict) -> None:
    """Top-1 and top-5 accuracy on ``--eval-images`` (nothing without it) into ``results[label]``."""
    if not args.eval_images:
        return
    from d2prune.data.images import ImageBatches, image_folder
    from d2prune.evaluation.accuracy import evaluate_accuracy

    model = in_memory(args, model)
    with distributed.current().sync(f"reading the evaluation images {args.eval_images}"):
        folder = image_folder(args.eval_images, **_labels(model))
    home = next(model.parameters()).device
    model.to(args.device)
    try:
        result = evaluate_accuracy(
            model,
            ImageBatches(processor, folder, args.eval_batch_size),
            progress=not args.no_progress,
            compute_dtype=args.compute.dtype,
        )
    finally:
        model.to(home)
    results[label] = {**result.to_dict(), "source": str(args.eval_images)}


def evaluate_timed(model: Any, processor: Any, args: argparse.Namespace, label: str, acc: dict, timings: dict) -> None:
    t0 = time.perf_counter()
    evaluate(model, processor, args, label, acc)
    timings["eval" if label == "model" else f"eval_{label}"] = time.perf_counter() - t0


def summary_columns(acc: dict) -> dict[str, Any]:
    """The printed table's accuracy columns (percent)."""
    row: dict[str, Any] = {}
    for label in ("dense", "pruned", "model"):
        if label in acc:
            name = "" if label == "model" else f"{label} "
            row[f"{name}top-1 %"] = 100 * acc[label]["top1"]
            row[f"{name}top-5 %"] = 100 * acc[label]["top5"]
    return row


def sources(args: argparse.Namespace, calib: str | None) -> list[dict]:
    """Name, path and fingerprint of the calibration and evaluation image folders."""
    from d2prune.data.images import folder_info

    return [folder_info(p) for p in (calib, args.eval_images) if p]
