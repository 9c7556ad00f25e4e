"""``d2prune prune``: prune a model, evaluate it, write a run record (and the pruned model)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from d2prune.cli import common
from d2prune.cli.method_options import (
    add_method_choice,
    add_method_options,
    check_heldout_request,
    heldout_option,
    heldout_request,
    method_config_from_args,
    text_sources,
)
from d2prune.cli.options import add_model_args, argument_group, layer_sparsities, pattern
from d2prune.engine import distributed
from d2prune.errors import UserError
from d2prune.methods.base import REFIT_GROUP


def add_parser(sub: argparse._SubParsersAction) -> None:
    add_prune_options(sub.add_parser("prune", help="prune a model, evaluate it, write a run record"))


def add_prune_options(pr: argparse.ArgumentParser) -> None:
    """Every option of ``d2prune prune`` (``d2prune sweep`` builds on them)."""
    add_model_args(pr)
    add_method_choice(pr)
    pr.add_argument("--sparsity", "--sparsity_ratio", type=float, default=0.5, help="target sparsity (default 0.5)")
    pr.add_argument(
        "--pattern",
        "--sparsity_type",
        default="unstructured",
        help="unstructured or N:M, N zeros per M (2:4, 4:8, 3:4)",
    )
    pr.add_argument("--prune_n", type=int, default=0, help=argparse.SUPPRESS)
    pr.add_argument("--prune_m", type=int, default=0, help=argparse.SUPPRESS)
    pr.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    pr.add_argument(
        "--calib", "--cali_dataset", default="c4", help="calibration source: c4, a file or a folder (default c4)"
    )
    pr.add_argument(
        "--calib-data-path", "--cali_data_path", default=None, help="file or folder for the calibration source"
    )
    pr.add_argument("--batch-size", type=int, default=1, help="calibration windows per layer forward (default 1)")
    pr.add_argument("--eval-dense", action="store_true", help="also measure the dense model's perplexity first")
    pr.add_argument(
        "--save-model",
        "--save_model",
        nargs="?",
        const=True,
        default=None,
        help="save the pruned model (to PATH, or OUTPUT_DIR/model)",
    )
    pr.add_argument("--no-measure-error", action="store_true", help="skip the reconstruction-error statistic (faster)")
    pr.add_argument(
        "--resume",
        default=None,
        metavar="OUT",
        help="continue an interrupted --offload disk run whose --output-dir was OUT (repeat its command)",
    )
    ls = pr.add_argument_group("layer-wise sparsity")
    ls.add_argument(
        "--sparsity-profile", default="uniform", help="uniform (default) or owl (outlier-weighted, per layer)"
    )
    ls.add_argument(
        "--owl-lambda", type=float, default=0.08, help="OWL: per-layer sparsities within [p-λ, p+λ] (default 0.08)"
    )
    ls.add_argument("--owl-m", type=float, default=5.0, help="OWL: outlier threshold, times the mean score (default 5)")
    ls.add_argument(
        "--layer-sparsities",
        nargs="+",
        default=None,
        help="explicit per-decoder-layer sparsities (numbers, or one JSON file holding a list)",
    )
    rf = argument_group(pr, REFIT_GROUP)
    rf.add_argument(
        "--refit",
        choices=["cg", "none"],
        default="none",
        help="cg: re-solve each pruned linear's kept weights for the least output error on its mask "
        "(batched preconditioned conjugate gradients); none (default): keep the method's weights",
    )
    rf.add_argument("--refit-iters", type=int, default=100, help="most CG iterations per linear (default 100)")
    hs = pr.add_argument_group(heldout_title())
    hs.add_argument("--heldout-source", default=None, help="held-out text source (default: the calibration source)")
    hs.add_argument("--heldout-windows", type=int, default=16, help="held-out windows (default 16)")
    hs.add_argument("--heldout-seed", type=int, default=1, help="seed of the held-out draw (default 1)")
    add_method_options(pr)


def heldout_title() -> str:
    """The held-out section's title, naming the option value that asks for the choice and what it chooses."""
    opt = heldout_option()
    if opt is None:
        return "held-out choice"
    spec = opt.metadata["heldout"]
    return f"{opt.flag} {spec['value']}: held-out choice of {spec['choice']}"


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


def read_text_sources(args: argparse.Namespace, config, tokenizer) -> None:
    """Method options that name text (e.g. --gradient-source) become token windows drawn like the calibration's."""
    from d2prune.data import get_calibration

    for field, what, source in text_sources(args, config.method):
        with distributed.current().sync(f"reading the {what} data"):
            config.method = dataclasses.replace(
                config.method,
                **{
                    field: get_calibration(
                        tokenizer,
                        source,
                        nsamples=args.nsamples,
                        seqlen=args.seqlen,
                        seed=args.seed,
                        data_dir=args.data_dir_path,
                        cache_dir=args.cache_dir_path,
                    )
                },
            )


def prune_streamed(args: argparse.Namespace, calibration, config, output_dir: Path, record: dict):
    """Prune layer by layer from disk, writing the pruned model as it goes; returns (report, its folder)."""
    from d2prune.streaming import prune_checkpoint, work_dir

    target = Path(args.save_model) if args.save_model not in (None, True) else output_dir / "model"
    args.interrupt_hint = (
        f"progress is kept in {work_dir(target)}; add --resume {output_dir} to the same command to continue"
        + (" (in one process, without torchrun)" if distributed.current().size > 1 else "")
    )
    report, model = prune_checkpoint(
        args.model, calibration, config, target, dtype=args.dtype, resume=bool(args.resume)
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
        )
    report, choice = selection.choose_on_heldout(model, calibration, heldout, config)
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
    save_pruned(model, tokenizer, target, report.sparsity_record())
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
    for name in args.eval:
        if name.lower() != "none":
            row[f"dense ppl ({name})"] = ppl.get("dense", {}).get(name, {}).get("ppl")
            row[f"pruned ppl ({name})"] = ppl["pruned"][name]["ppl"]
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

    calib_source = args.calib_data_path or args.calib
    calibration = read_calibration(args, tokenizer, calib_source, timings)
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


def read_calibration(args: argparse.Namespace, tokenizer, calib_source: str, timings: dict):
    """The calibration token windows (timed as ``calibration_data``)."""
    from d2prune.data import get_calibration

    t0 = time.perf_counter()
    with distributed.current().sync("reading the calibration data"):
        calibration = get_calibration(
            tokenizer,
            calib_source,
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            seed=args.seed,
            data_dir=args.data_dir_path,
            cache_dir=args.cache_dir_path,
        )
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
        seqlen=args.seqlen,
        sources=common.sources(args, calib_source),
        perplexity=ppl,
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
