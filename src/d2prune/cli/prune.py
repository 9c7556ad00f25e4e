"""``d2prune prune``: prune a model, evaluate it, write a run record (and the pruned model)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from d2prune.cli import common, vision
from d2prune.cli.method_options import (
    check_heldout_request,
    heldout_request,
    method_config_from_args,
    text_sources,
)
from d2prune.cli.options import layer_sparsities, pattern
from d2prune.cli.prune_options import add_prune_options
from d2prune.engine import distributed
from d2prune.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_prune_options(sub.add_parser("prune", help="prune a model, evaluate it, write a run record"))


def resume_policy(args: argparse.Namespace) -> None:
    """--resume continues a streamed run in its own output folder."""
    from d2prune.streaming import RESUME_UNDER_TORCHRUN

    if not args.resume:
        return
    if distributed.current().size > 1:
        raise UserError(RESUME_UNDER_TORCHRUN)
    if args.output_dir and Path(args.output_dir).resolve() != Path(args.resume).resolve():
        raise UserError(f"--resume {args.resume} and --output-dir {args.output_dir} name different folders")
    if args.offload == "none":
        raise UserError("--resume continues a run that streamed the model from disk; it cannot use --offload none")
    args.output_dir, args.offload = args.resume, "disk"


def prune_config(args: argparse.Namespace, output_dir: Path | None, streamed: bool):
    """The run's PruneConfig from the options, with the checks that need no model."""
    from d2prune.config import PruneConfig

    config = PruneConfig(
        method=method_config_from_args(args),
        sparsity=args.sparsity,
        pattern=pattern(args),
        device=args.device,
        compute_dtype=args.compute_dtype,
        batch_size=args.batch_size,
        measure_error=not args.no_measure_error,
        progress=not args.no_progress,
        sparsity_profile=args.sparsity_profile,
        owl_lambda=args.owl_lambda,
        owl_m=args.owl_m,
        layer_sparsities=layer_sparsities(args.layer_sparsities),
        activation_offload=args.activation_offload,
        offload_threshold=args.offload_threshold,
        refit=args.refit,
        refit_iters=args.refit_iters,
        # Next to the output rather than in /tmp, which is often a RAM disk.
        activation_dir=str(output_dir / ".activations") if output_dir else None,
    )
    check_heldout_request(args, config.method)
    if args.nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {args.nsamples}")
    if args.save_model and output_dir is None and args.save_model is True:
        raise UserError("--save-model without a path needs --output-dir")
    if args.save_format != "dense" and not args.save_model and not streamed:
        raise UserError(f"--save-format {args.save_format} describes the saved model: add --save-model")
    if streamed:
        check_streamable(args, config, output_dir)
    return config


def check_streamable(args: argparse.Namespace, config, output_dir: Path | None) -> None:
    """What a prune that streams the model from disk needs (it writes the model as it goes)."""
    if output_dir is None:
        raise UserError("--offload disk writes the pruned model as it goes: it needs --output-dir")
    if config.method.chooses_on_heldout():
        raise UserError(
            f"{heldout_request(args) or 'a held-out choice'} prunes several copies of the model in "
            f"memory; use --offload none"
        )
    obstacle = config.method.streaming_obstacle()
    if obstacle:
        raise UserError(f"{obstacle}; use --offload none")


def draw_windows(args: argparse.Namespace, tokenizer, source: str, what: str):
    """Token windows of ``source`` drawn the calibration's way (--nsamples, --seqlen, --seed, --window-bos)."""
    from d2prune.data import get_calibration

    with distributed.current().sync(f"reading the {what} data"):
        return get_calibration(
            tokenizer,
            source,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
            data_dir=args.data_dir_path,
            cache_dir=args.cache_dir_path,
            window_bos=args.bos,
        )


def read_text_sources(args: argparse.Namespace, config, tokenizer) -> None:
    """Method options that name text (e.g. --gradient-source) become token windows drawn like the calibration's."""
    for field, what, source in text_sources(args, config.method):
        config.method = dataclasses.replace(config.method, **{field: draw_windows(args, tokenizer, source, what)})


def prune_streamed(args: argparse.Namespace, calibration, config, output_dir: Path, record: dict):
    """Prune layer by layer from disk, writing the pruned model as it goes; returns (report, its folder)."""
    from d2prune.streaming import prune_checkpoint, work_dir

    target = Path(args.save_model) if args.save_model not in (None, True) else output_dir / "model"
    args.interrupt_hint = (
        f"progress is kept in {work_dir(target)}; add --resume {output_dir} to the same command to continue"
        + (" (in one process, without torchrun)" if distributed.current().size > 1 else "")
    )
    report, model = prune_checkpoint(
        args.model,
        calibration,
        config,
        target,
        dtype=args.dtype,
        resume=bool(args.resume),
        save_format=args.save_format,
    )
    args.interrupt_hint = None
    record["saved_model"] = str(target)
    return report, model


def prune_choosing_on_heldout(
    args: argparse.Namespace, model, tokenizer, calibration, config, calib_source: str, record: dict
):
    """Prune once per held-out candidate and keep the best (``d2prune.selection``); records the choice."""
    from d2prune import selection
    from d2prune.data import get_heldout

    if args.vision:
        heldout = vision.heldout(args, model, tokenizer, args.heldout_source or calib_source)
    else:
        with distributed.current().sync("reading the held-out data"):
            heldout = get_heldout(
                tokenizer,
                args.heldout_source or calib_source,
                nsamples=args.heldout_windows,
                seqlen=args.seqlen,
                calib_nsamples=args.nsamples,
                calib_seed=args.seed,
                seed=args.heldout_seed,
                data_dir=args.data_dir_path,
                window_bos=args.bos,
            )
    # `d2prune sweep` keeps each cell's search resumable: (folder, identity) of the cell.
    folder, identity = getattr(args, "heldout_progress", (None, ""))
    report, choice = selection.choose_on_heldout(
        model, calibration, heldout, config, progress_dir=folder, identity=identity
    )
    choice["heldout_source"] = args.heldout_source or calib_source
    choice["heldout_seed"] = args.heldout_seed
    record[config.method.heldout_record_key] = choice
    return report


def prune_model(
    args: argparse.Namespace,
    model,
    tokenizer,
    calibration,
    config,
    calib_source: str,
    output_dir: Path | None,
    record: dict,
):
    """Prune the way the run asks: streamed from disk, choosing on held-out data, or plainly."""
    from d2prune.api import prune

    if isinstance(model, Path):
        return prune_streamed(args, calibration, config, output_dir, record)
    if config.method.chooses_on_heldout():
        return prune_choosing_on_heldout(args, model, tokenizer, calibration, config, calib_source, record), model
    return prune(model, calibration, config), model


def save(
    args: argparse.Namespace, model, tokenizer, report, output_dir: Path | None, record: dict, timings: dict
) -> None:
    """--save-model of a model pruned in memory (a streamed run has written it already)."""
    from d2prune.io.models import save_pruned

    target = Path(args.save_model) if args.save_model is not True else output_dir / "model"
    t0 = time.perf_counter()
    save_pruned(model, tokenizer, target, report.sparsity_record(), save_format=args.save_format)
    timings["save"] = time.perf_counter() - t0
    record["saved_model"] = str(target)


def summary_row(args: argparse.Namespace, config, report, ppl: dict, timings: dict) -> dict[str, Any]:
    """The printed one-row summary: method, sparsity, perplexities, refit errors, seconds."""
    row = {
        "method": config.method.name,
        "pattern": str(config.pattern),
        "target": config.pattern.sparsity if config.pattern.is_nm else config.sparsity,
        "achieved": report.overall_sparsity,
    }
    for name in [] if args.vision else args.eval:
        if name.lower() != "none":
            row[f"dense ppl ({name})"] = ppl.get("dense", {}).get(name, {}).get("ppl")
            row[f"pruned ppl ({name})"] = ppl["pruned"][name]["ppl"]
    if args.vision:
        row.update(vision.summary_columns(ppl))
    refitted = [lin for lin in report.linears if lin.relative_error_before_refit is not None]
    if refitted:  # mean relative error of the refitted linears, before and after the refit
        row["err before refit"] = sum(lin.relative_error_before_refit for lin in refitted) / len(refitted)
        row["err after refit"] = sum(lin.relative_error for lin in refitted) / len(refitted)
    row["prune s"] = timings["prune"]
    row["total s"] = sum(timings.values())
    return row


def run(args: argparse.Namespace) -> int:
    from d2prune.io.record import format_table, write_json_atomic

    common.check_model_options(args)
    resume_policy(args)
    offload = common.offload_policy(args)
    streamed = offload["weights"] == "disk"
    common.check_data_options(args)
    record = common.new_record(args, offload)
    timings: dict[str, float] = {}
    ppl: dict[str, dict] = {}
    output_dir = Path(args.output_dir) if args.output_dir else None
    config = prune_config(args, output_dir, streamed)
    if streamed and args.zero_shot:
        raise UserError("--zero-shot needs the whole model in memory; use --offload none")
    model, tokenizer = common.load(args, streamed, timings)
    if args.vision:
        vision.check_options(args, config)
    else:
        vision.check_images_only(args)
        common.window_bos(args, model, tokenizer, record)

    calib_source = args.calib_data_path or args.calib
    calibration = read_calibration(args, model, tokenizer, calib_source, timings)
    if args.eval_dense:
        t0 = time.perf_counter()
        common.evaluate(model, tokenizer, args, "dense", ppl)
        timings["eval_dense"] = time.perf_counter() - t0
    done = prune_and_record(args, model, tokenizer, calibration, config, calib_source, output_dir, record, timings, ppl)
    if done is None:
        return 0
    record, row = done
    print(format_table([row], list(row)))
    if output_dir:
        path = write_json_atomic(output_dir / "run.json", record)
        print(f"run record: {path}")
    return 0


def read_calibration(args: argparse.Namespace, model, tokenizer, calib_source: str, timings: dict):
    """The calibration token windows, or images for an image classifier (timed as ``calibration_data``)."""
    t0 = time.perf_counter()
    if args.vision:
        calibration = vision.calibration(args, model, tokenizer, calib_source)
    else:
        calibration = draw_windows(args, tokenizer, calib_source, "calibration")
    timings["calibration_data"] = time.perf_counter() - t0
    return calibration


def prune_and_record(
    args: argparse.Namespace,
    model,
    tokenizer,
    calibration,
    config,
    calib_source: str,
    output_dir: Path | None,
    record: dict,
    timings: dict,
    ppl: dict,
) -> tuple[dict, dict] | None:
    """Prune, evaluate and (--save-model) save; the completed run record and the summary row
    (None on ranks other than 0, which neither print nor write)."""
    read_text_sources(args, config, tokenizer)

    t0 = time.perf_counter()
    report, model = prune_model(args, model, tokenizer, calibration, config, calib_source, output_dir, record)
    timings["prune"] = time.perf_counter() - t0

    common.evaluate_all(model, tokenizer, args, "pruned", ppl, record, timings)
    if distributed.current().rank > 0:  # only rank 0 saves, prints and writes the run record
        return None
    record.update(
        config=report.config,
        seed=args.seed,
        nsamples=args.nsamples,
        seqlen=report.seqlen if args.vision else args.seqlen,
        sources=vision.sources(args, calib_source) if args.vision else common.sources(args, calib_source),
        **({"accuracy": ppl, "image_size": report.image_size} if args.vision else {"perplexity": ppl}),
        timings=timings,
        prune_timings=report.timings,
        overall_sparsity=report.overall_sparsity,
        nm_structure_ok=report.nm_ok,
        layer_sparsities=report.layer_sparsities,
        outlier_ratios=report.outlier_ratios,
        activations=report.activations,
        resumed_at_layer=report.resumed_at_layer,
        linears=report.to_dict()["linears"],
    )
    if args.save_model and not isinstance(model, Path):
        save(args, model, tokenizer, report, output_dir, record, timings)
    return record, summary_row(args, config, report, ppl, timings)
