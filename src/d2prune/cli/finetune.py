"""``d2prune finetune``: masked-LoRA recovery fine-tuning of a pruned model that keeps its zeros."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from d2prune.cli import common
from d2prune.cli.options import add_model_args
from d2prune.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="LoRA recovery fine-tuning of a pruned model that keeps its zeros")
    add_model_args(ft)
    ft.add_argument("--data", default="c4", help="training text: c4, a file or a folder (default c4)")
    ft.add_argument("--max-train-samples", type=int, default=None, help="use the first N blocks (default: all)")
    ft.add_argument("--block-size", type=int, default=1024, help="tokens per training block (default 1024)")
    ft.add_argument("--epochs", type=int, default=1, help="passes over the blocks (default 1)")
    ft.add_argument("--max-steps", type=int, default=None, help="stop after K optimizer steps (overrides --epochs)")
    ft.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, AdamW (default 1e-4)")
    ft.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up steps, then linear decay (default 5)")
    ft.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    ft.add_argument("--batch-size", type=int, default=1, help="blocks per forward (default 1)")
    ft.add_argument(
        "--effective-batch-size",
        type=int,
        default=128,
        help="blocks per optimizer step, by gradient accumulation (default 128)",
    )
    ft.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    ft.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / r (default 16)")
    ft.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input (default 0.05)")
    ft.add_argument(
        "--lora-targets", default="q_proj,v_proj", help="comma list of linear names (default q_proj,v_proj)"
    )
    ft.add_argument("--save-steps", type=int, default=None, help="checkpoint every K optimizer steps (and at the end)")
    ft.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in OUTPUT_DIR/checkpoints"
    )
    ft.add_argument(
        "--save",
        choices=["merged", "adapter", "both", "none"],
        default="merged",
        help="OUTPUT_DIR/model (merged, plain transformers), OUTPUT_DIR/adapter (masked LoRA), both, none",
    )
    ft.add_argument(
        "--save-format",
        choices=["dense", "sparse"],
        default="dense",
        help="of the merged model: dense (default, plain transformers) or sparse (kept values + 1-bit mask)",
    )
    ft.add_argument("--eval-before", action="store_true", help="also measure perplexity before fine-tuning")


def finetune_config(args: argparse.Namespace):
    """The fine-tuning options as a FinetuneConfig."""
    from d2prune.finetune import FinetuneConfig

    return FinetuneConfig(
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets,
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        effective_batch_size=args.effective_batch_size,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        save_steps=args.save_steps,
        seed=args.seed,
        device=args.device,
        compute_dtype=args.compute_dtype,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    if not args.output_dir:
        raise UserError("finetune needs --output-dir (model, checkpoints and run record go there)")
    common.check_model_options(args)
    if args.offload == "disk":
        raise UserError("finetune trains the whole model in memory; --offload disk applies to prune and eval")
    if args.save_format != "dense" and args.save not in ("merged", "both"):
        raise UserError(f"--save-format {args.save_format} describes the merged model: use --save merged or both")
    args.offload = "none"
    offload = common.offload_policy(args)
    common.check_data_options(args)
    record = common.new_record(args, offload)
    timings: dict[str, float] = {}
    model, tokenizer = common.load(args, False, timings)
    common.window_bos(args, model, tokenizer, record)
    return train_evaluate_save(args, model, tokenizer, record, timings)


def train_evaluate_save(args: argparse.Namespace, model, tokenizer, record: dict, timings: dict) -> int:
    """Masked LoRA on a pruned model, exact merge, evaluation, save, record."""
    from d2prune.data import get_train_blocks

    try:
        from d2prune.finetune import finetune, linear_zeros, merge_masked_lora, plot_loss, save_adapter
    except ImportError as exc:
        raise UserError(f"d2prune finetune needs peft: pip install 'd2prune[finetune]' ({exc})") from None
    from d2prune.io.models import load_sparsity_record, model_seqlen, save_pruned
    from d2prune.io.record import format_table, write_json_atomic

    config = finetune_config(args)
    if args.max_train_samples is not None and args.max_train_samples < 1:
        raise UserError(f"--max-train-samples must be at least 1, got {args.max_train_samples}")
    context = model_seqlen(model)
    if args.block_size < 2 or args.block_size > context:
        raise UserError(f"--block-size must be in [2, {context}] (the model's context), got {args.block_size}")
    output_dir = Path(args.output_dir)
    model_path = Path(args.model).expanduser()
    sparsity_record = load_sparsity_record(model_path) if model_path.is_dir() else None
    ppl: dict[str, dict] = {}

    t0 = time.perf_counter()
    blocks = get_train_blocks(
        tokenizer,
        args.data,
        block_size=args.block_size,
        max_samples=args.max_train_samples,
        data_dir=args.data_dir_path,
        cache_dir=args.cache_dir_path,
        window_bos=args.bos,
    )
    timings["train_data"] = time.perf_counter() - t0
    if args.max_train_samples and len(blocks) < args.max_train_samples:
        logging.getLogger("d2prune").warning(
            "%s holds only %d blocks of %d tokens (asked for %d)",
            args.data,
            len(blocks),
            args.block_size,
            args.max_train_samples,
        )
    if args.eval_before:
        t0 = time.perf_counter()
        common.evaluate(model, tokenizer, args, "before", ppl)
        timings["eval_before"] = time.perf_counter() - t0

    report = finetune(
        model,
        blocks,
        config,
        checkpoint_dir=output_dir / "checkpoints",
        resume=args.resume,
        sparsity_record=sparsity_record,
    )
    timings["train"] = report.train_seconds
    info = {k: v for k, v in report.to_dict().items() if k != "loss_curve"}
    if args.save in ("adapter", "both"):
        t0 = time.perf_counter()
        record["saved_adapter"] = str(save_adapter(report.model, tokenizer, output_dir / "adapter", args.model, info))
        timings["save_adapter"] = time.perf_counter() - t0
    model = merge_masked_lora(report.model)
    after = linear_zeros(model)
    zeros_after = sum(z for z, _ in after.values())
    if zeros_after != report.zeros:  # merge_masked_lora checked every adapted linear; this counts them all
        raise RuntimeError(f"sparsity changed by fine-tuning: {report.zeros} zeros before, {zeros_after} after")
    common.evaluate_all(model, tokenizer, args, "finetuned", ppl, record, timings)
    if args.save in ("merged", "both"):
        t0 = time.perf_counter()
        saved = dict(sparsity_record or {})
        saved.update(
            overall_sparsity=zeros_after / max(report.weights, 1),
            linears={n: z / w for n, (z, w) in after.items()},
            finetune={"base_model": args.model, **info},
        )
        record["saved_model"] = str(
            save_pruned(model, tokenizer, output_dir / "model", saved, save_format=args.save_format)
        )
        timings["save"] = time.perf_counter() - t0

    plot = plot_loss(report.loss_curve, output_dir / "loss.png", title=f"masked LoRA on {args.model}")
    record.update(
        finetune=info,
        loss_curve=report.loss_curve,
        loss_plot=str(plot) if plot else None,
        data={
            "source": args.data,
            "block_size": args.block_size,
            "blocks": report.n_blocks,
            "blocks_seen": report.blocks_seen,
            "tokens_seen": report.tokens_seen,
        },
        sparsity={
            "before": report.overall_sparsity,
            "after": zeros_after / max(report.weights, 1),
            "zeros_before": report.zeros,
            "zeros_after": zeros_after,
            "weights": report.weights,
        },
        sources=common.sources(args, args.data),
        perplexity=ppl,
        timings=timings,
        seed=args.seed,
        seqlen=args.seqlen,
    )
    row = {
        "steps": report.steps,
        "tokens": report.tokens_seen,
        "first loss": report.loss_curve[0]["loss"] if report.loss_curve else None,
        "last loss": report.loss_curve[-1]["loss"] if report.loss_curve else None,
        "sparsity": zeros_after / max(report.weights, 1),
    }
    for name in args.eval:
        if name.lower() != "none":
            if args.eval_before:
                row[f"ppl before ({name})"] = ppl["before"][name]["ppl"]
            row[f"ppl after ({name})"] = ppl["finetuned"][name]["ppl"]
    row["train s"] = report.train_seconds
    print(format_table([row], list(row)))
    print(f"run record: {write_json_atomic(output_dir / 'run.json', record)}")
    return 0
