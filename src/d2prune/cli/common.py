"""What the prune, eval and finetune commands share: rank and offload policy, loading, evaluation
and the run record's common parts."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

from d2prune.cli.options import task_list
from d2prune.engine import distributed
from d2prune.errors import UserError


def join_ranks(args: argparse.Namespace) -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the other ranks; True if a process group was started."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
        return False
    if args.command not in ("prune", "eval"):
        raise UserError(f"d2prune {args.command} runs in one process: launch it without torchrun")
    world, args.device = distributed.init_from_env(args.device, args.dist_timeout)
    if world.rank > 0:
        args.no_progress = True  # one set of progress bars, rank 0's
    logging.basicConfig(
        level=logging.WARNING, format=f"%(levelname)s [rank {world.rank}] %(name)s: %(message)s", force=True
    )
    return True


def check_model_options(args: argparse.Namespace) -> None:
    """The model given (positional or --model) and the memory options valid."""
    from d2prune.engine.activations import check_mode

    args.model = args.model or args.model_opt
    if not args.model:
        raise UserError("no model given: pass a model folder, a Hub id, a .gguf file or 'smollm2-135m'")
    check_mode(args.activation_offload)
    if args.offload_threshold <= 0:
        raise UserError(
            f"--offload-threshold is a fraction of the available memory (> 0), got {args.offload_threshold}"
        )


def offload_policy(args: argparse.Namespace) -> dict[str, Any]:
    """Whether the weights stream from disk (``offload["weights"] == "disk"``), agreed by all ranks."""
    from d2prune.streaming import resolve_offload

    world = distributed.current()
    if world.size > 1:
        # [distributed] each rank holds its own copy of the model and activations: the ranks on one
        # machine share its memory, so "auto" allows each of them an equal part of the threshold
        args.offload_threshold /= int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    with world.sync("choosing --offload"):
        offload = resolve_offload(args.offload, args.model, args.dtype, args.offload_threshold)
    if world.size > 1 and args.offload == "auto":
        # [distributed] every rank must take the same path: all stream if one of them would
        streams = not world.all_true(offload["weights"] != "disk", "agreeing on --offload auto")
        offload["weights"] = "disk" if streams else "none"
    if offload["weights"] == "disk":
        from d2prune.streaming import limit_heap_retention

        limit_heap_retention()  # before the calibration data and the layers come and go
    return offload


def check_data_options(args: argparse.Namespace) -> None:
    """Check --seqlen and resolve the data and cache folders (``args.data_dir_path``, ``args.cache_dir_path``)."""
    from d2prune.data import default_data_dir

    if args.seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {args.seqlen}")
    args.data_dir_path = Path(args.data_dir) if args.data_dir else default_data_dir()
    args.cache_dir_path = Path(args.cache_dir) if args.cache_dir else None


def new_record(args: argparse.Namespace, offload: dict[str, Any]) -> dict[str, Any]:
    """The run record's opening entries (the compute dtype resolved: ``args.compute``)."""
    from d2prune.engine.precision import resolve_compute_dtype
    from d2prune.io.folders import torch_dtype
    from d2prune.io.record import command_line, package_versions

    args.compute = resolve_compute_dtype(args.compute_dtype, args.device)
    return {
        "command": command_line(),
        "versions": package_versions(),
        "model": args.model,
        "offload": offload,
        "compute_dtype": args.compute.to_dict(torch_dtype(args.dtype)),
    }


def load(args: argparse.Namespace, streamed: bool, timings: dict[str, float]) -> tuple[Any, Any]:
    """The model (in memory on the CPU, or its folder when streamed) and its tokenizer (an image
    classifier's: its image processor; ``args.vision`` says which, from the model's config)."""
    from d2prune.finetune import adapters as _adapters  # noqa: F401 - registers the adapter-folder loader
    from d2prune.io.models import check_device, load_model

    t0 = time.perf_counter()
    with distributed.current().sync("loading the model"):  # [distributed] a rank that cannot load stops them all
        check_device(args.device)
        if streamed:
            from d2prune.io.folders import load_processor

            # The weights stay on disk; the model stands for its folder from here on.
            model, tokenizer = Path(args.model).expanduser(), load_processor(args.model)
        else:
            from d2prune.engine.finite import check_model_weights

            model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
            check_model_weights(model)  # streamed layers are checked as they are read
    timings["load"] = time.perf_counter() - t0
    args.vision = _is_image_classifier(model)
    if args.vision and args.command == "finetune":
        raise UserError("d2prune finetune trains causal LMs; this model is an image classifier")
    return model, tokenizer


def window_bos(args: argparse.Namespace, model, tokenizer, record: dict) -> None:
    """--window-bos for the loaded model (``args.bos``), with the choice and why in the run record."""
    from d2prune.data import resolve_window_bos

    if isinstance(model, Path):  # streamed: the folder stands for the model, its config.json has the model_type
        import json

        # The raw model_type, not AutoConfig: an architecture transformers does not know is refused later,
        # when the streamed model is built, with its own one-line error.
        model = str(json.loads((model / "config.json").read_text(encoding="utf-8")).get("model_type", ""))
    args.bos = resolve_window_bos(args.window_bos, model, tokenizer)
    record["window_bos"] = args.bos.to_dict()


def _is_image_classifier(model: Any) -> bool:
    from d2prune.cli.vision import model_config
    from d2prune.io.folders import is_image_classifier

    return is_image_classifier(model_config(model))


def evaluate(model, tokenizer, args: argparse.Namespace, label: str, results: dict) -> None:
    """Perplexity on every --eval set; ``model`` is a model in memory or the folder of one that is
    evaluated layer by layer from disk (--offload disk). An image classifier: accuracy on --eval-images."""
    if getattr(args, "vision", False):
        from d2prune.cli import vision

        vision.evaluate(model, tokenizer, args, label, results)
        return
    from d2prune.data import get_eval_tokens
    from d2prune.evaluation.perplexity import evaluate_ppl
    from d2prune.io.folders import torch_dtype
    from d2prune.streaming import evaluate_streamed

    streamed = isinstance(model, Path)
    bos = getattr(args, "bos", "never")  # set by window_bos(); a command that never called it: canonical windows
    # The model lives on the CPU between phases (pruning moves one layer at a time); evaluation
    # runs the whole model on the compute device.
    home = None if streamed else next(model.parameters()).device
    if not streamed:
        model.to(args.device)
    try:
        for i, name in enumerate(args.eval):
            if name.lower() == "none":
                continue
            source = args.eval_data_path if (i == 0 and args.eval_data_path) else name
            # ``d2prune sweep`` keeps the tokenized sets in ``args.eval_tokens`` between its runs.
            memo = getattr(args, "eval_tokens", None)
            tokens = memo.get(source) if memo is not None else None
            if tokens is None:
                with distributed.current().sync(f"reading the evaluation data {source}"):
                    tokens = get_eval_tokens(
                        tokenizer, source, data_dir=args.data_dir_path, cache_dir=args.cache_dir_path
                    )
                if memo is not None:
                    memo[source] = tokens
            options = dict(
                batch_size=args.eval_batch_size, max_windows=args.eval_windows, progress=not args.no_progress
            )
            if streamed:
                res = evaluate_streamed(
                    model,
                    tokens,
                    args.seqlen,
                    # Loading each layer in the compute dtype is the cast, without a second copy.
                    dtype=args.compute.name(torch_dtype(args.dtype)),
                    device=args.device,
                    activation_offload=args.activation_offload,
                    threshold=args.offload_threshold,
                    window_bos=bos,
                    **options,
                )
            else:
                res = evaluate_ppl(
                    model, tokens, args.seqlen, compute_dtype=args.compute.dtype, window_bos=bos, **options
                )
            results.setdefault(label, {})[name] = res.to_dict()
    finally:
        if not streamed:
            model.to(home)


def zero_shot(model, tokenizer, args: argparse.Namespace) -> dict:
    """The --zero-shot tasks on ``model``, printed as a table."""
    from d2prune.evaluation.zeroshot import format_zero_shot_table, run_zero_shot

    result = run_zero_shot(
        model,
        tokenizer,
        tasks=task_list(args.tasks),
        data_dir=args.data_dir_path,
        limit=args.limit,
        batch_size=args.zero_shot_batch_size,
        device=args.device,
        compute_dtype=args.compute.dtype,
        share_contexts=getattr(args, "zero_shot_scoring", "shared-context") == "shared-context",
    )
    print(format_zero_shot_table(result))
    return result


def evaluate_all(model, tokenizer, args, label: str, ppl: dict, record: dict, timings: dict) -> None:
    """Perplexity on every --eval set, then zero-shot accuracy if asked; timings per phase."""
    t0 = time.perf_counter()
    evaluate(model, tokenizer, args, label, ppl)
    timings["eval" if label == "model" else f"eval_{label}"] = time.perf_counter() - t0
    world = distributed.current()
    if world.size > 1:
        # The last collective step: rank 0 alone may then run zero-shot tasks and save, and the
        # other ranks must not wait for that.
        record["distributed"] = ranks_record(world, args, timings)
    if args.zero_shot and world.rank == 0:  # lm-eval runs whole, on rank 0 only
        t0 = time.perf_counter()
        record["zero_shot"] = zero_shot(model, tokenizer, args)
        timings["zero_shot"] = time.perf_counter() - t0


def ranks_record(world: distributed.World, args: argparse.Namespace, timings: dict) -> dict:
    """World size and backend, and per rank: host, device, peak RSS so far (MB) and prune seconds."""
    import resource
    import socket

    mine = {
        "rank": world.rank,
        "host": socket.gethostname(),
        "device": args.device,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "prune_s": timings.get("prune"),
    }
    return {
        "world_size": world.size,
        "backend": world.backend,
        "timeout_s": world.timeout_s,
        "ranks": world.all_gathered(mine, "gathering the ranks' summaries"),
    }


def sources(args: argparse.Namespace, calib: str | None) -> list[dict]:
    """Name, path and SHA-256 of the calibration (or training) source and of every --eval set."""
    from d2prune.data import source_info

    names = ([calib] if calib else []) + [
        (args.eval_data_path if (i == 0 and args.eval_data_path) else e)
        for i, e in enumerate(args.eval)
        if e.lower() != "none"
    ]
    out = []
    for name in names:
        try:
            out.append(source_info(name, args.data_dir_path))
        except UserError:
            out.append({"source": name, "path": None, "sha256": None})
    return out
