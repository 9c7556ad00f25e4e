"""The ``d2prune`` command line: ``d2prune prune|eval|finetune|attention MODEL ...``.

The paper repository's flag names (``--prune_method``, ``--sparsity_ratio``, ...) are accepted as
aliases so its scripts run unchanged.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from d2prune.engine import distributed
from d2prune.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"d2prune: error: {message}\n")


def _target_layers(values: list[str] | None) -> list[str] | None:
    """Names from ``--target-layers a b`` or the reference's ``"['a', 'b']"``; 'none' means []."""
    if values is None:
        return None
    names: list[str] = []
    for value in values:
        value = value.strip()
        if value.startswith("["):
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise UserError(f"cannot parse target layer list {value!r}") from None
            names.extend(str(v) for v in parsed)
        elif value.lower() != "none":
            names.extend(v for v in value.split(",") if v)
    return names


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="HF folder, Hub id, .gguf file, or 'smollm2-135m'")
    p.add_argument("--model", dest="model_opt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--data-dir", "--data_dir", default=None, help="data folder (env D2PRUNE_DATA; default ../shared/data)")
    p.add_argument("--cache-dir", "--data_cache_dir", default=None, help="token cache folder (default ~/.cache/d2prune)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration and evaluation window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    p.add_argument(
        "--eval", "--eval_dataset", dest="eval", nargs="+", default=["wikitext2"],
        help="perplexity sets: wikitext2, ptb, a text file, or 'none' (default wikitext2)",
    )
    p.add_argument("--eval-data-path", "--eval_data_path", default=None, help="file or folder for the (first) eval set")
    p.add_argument("--eval-windows", type=int, default=None, help="use only the first K evaluation windows")
    p.add_argument("--eval-batch-size", type=int, default=1, help="windows per evaluation forward (default 1)")
    p.add_argument("--output-dir", "--output_dir", default=None, help="folder for run.json (and the saved model)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help=f"under torchrun: seconds to wait for another rank before failing "
                        f"(env {distributed.TIMEOUT_ENV}; default {distributed.DEFAULT_TIMEOUT_S:g})")
    mem = p.add_argument_group("memory")
    mem.add_argument("--offload", default="auto",
                     help="disk: stream one decoder layer at a time from the safetensors folder; none: load the "
                          "whole model; auto (default): disk when the weights exceed --offload-threshold of free RAM")
    mem.add_argument("--offload-threshold", type=float, default=0.5,
                     help="fraction of the available memory that auto offloading allows (default 0.5; under "
                          "torchrun shared equally by the ranks of a machine)")
    mem.add_argument("--activation-offload", default="auto",
                     help="calibration activations in ram, in memory-mapped files on disk, or auto (default: disk "
                          "when they exceed --offload-threshold of free RAM)")
    zs = p.add_argument_group("zero-shot accuracy (lm-evaluation-harness, offline task data from the data dir)")
    zs.add_argument("--zero-shot", "--eval-zero-shot", "--eval_zero_shot", dest="zero_shot", action="store_true",
                    help="also run the zero-shot tasks")
    zs.add_argument("--tasks", default="paper",
                    help="comma list (boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,piqa), "
                         "'paper' (the first seven, default) or 'all'")
    zs.add_argument("--limit", type=int, default=None, help="first K items of each task (quick runs)")
    zs.add_argument("--zero-shot-batch-size", type=int, default=1, help="lm-eval batch size (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="d2prune", description="One-shot post-training pruning of Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser("prune", help="prune a model, evaluate it, write a run record")
    _add_model_args(pr)
    pr.add_argument("--method", "--prune_method", default="d2prune",
                    help="d2prune | sparsegpt | wanda | pruner-zero | magnitude | alps | d2alps | ria | dsnot")
    pr.add_argument("--sparsity", "--sparsity_ratio", type=float, default=0.5, help="target sparsity (default 0.5)")
    pr.add_argument("--pattern", "--sparsity_type", default="unstructured", help="unstructured or N:M, N zeros per M (2:4, 4:8, 3:4)")
    pr.add_argument("--prune_n", type=int, default=0, help=argparse.SUPPRESS)
    pr.add_argument("--prune_m", type=int, default=0, help=argparse.SUPPRESS)
    pr.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    pr.add_argument("--calib", "--cali_dataset", default="c4", help="calibration source: c4, a file or a folder (default c4)")
    pr.add_argument("--calib-data-path", "--cali_data_path", default=None, help="file or folder for the calibration source")
    pr.add_argument("--batch-size", type=int, default=1, help="calibration windows per layer forward (default 1)")
    pr.add_argument("--eval-dense", action="store_true", help="also measure the dense model's perplexity first")
    pr.add_argument("--save-model", "--save_model", nargs="?", const=True, default=None,
                    help="save the pruned model (to PATH, or OUTPUT_DIR/model)")
    pr.add_argument("--no-measure-error", action="store_true", help="skip the reconstruction-error statistic (faster)")
    pr.add_argument("--resume", default=None, metavar="OUT",
                    help="continue an interrupted --offload disk run whose --output-dir was OUT (repeat its command)")
    ls = pr.add_argument_group("layer-wise sparsity")
    ls.add_argument("--sparsity-profile", default="uniform", help="uniform (default) or owl (outlier-weighted, per layer)")
    ls.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: per-layer sparsities within [p-λ, p+λ] (default 0.08)")
    ls.add_argument("--owl-m", type=float, default=5.0, help="OWL: outlier threshold, times the mean score (default 5)")
    ls.add_argument("--layer-sparsities", nargs="+", default=None,
                    help="explicit per-decoder-layer sparsities (numbers, or one JSON file holding a list)")
    rf = pr.add_argument_group("refit: exact least squares on each linear's mask, after any method")
    rf.add_argument("--refit", choices=["cg", "none"], default="none",
                    help="cg: re-solve each pruned linear's kept weights for the least output error on its mask "
                         "(batched preconditioned conjugate gradients); none (default): keep the method's weights")
    rf.add_argument("--refit-iters", type=int, default=100, help="most CG iterations per linear (default 100)")
    rf.add_argument("--refit-target-layers", action="store_true",
                    help="D²Prune: refit its no-update --target-layers too (default: left as pruned)")
    hs = pr.add_argument_group("--target-layers auto: held-out choice of the un-updated projection")
    hs.add_argument("--heldout-source", default=None, help="held-out text source (default: the calibration source)")
    hs.add_argument("--heldout-windows", type=int, default=16, help="held-out windows (default 16)")
    hs.add_argument("--heldout-seed", type=int, default=1, help="seed of the held-out draw (default 1)")
    pz = pr.add_argument_group("Pruner-Zero options")
    pz.add_argument("--gradient-source", default=None, help="text for the gradient pass (default: the calibration source)")
    pz.add_argument("--gradient-cache", default=None, help="safetensors file to store / reuse the gradient statistic")
    ds = pr.add_argument_group("DSnoT options")
    ds.add_argument("--dsnot-base", default="wanda",
                    help="method whose mask DSnoT refines, with its own options from the flags here (default wanda)")
    ds.add_argument("--dsnot-cycles", type=int, default=50, help="at most this many swaps per row (default 50)")
    ds.add_argument("--dsnot-threshold", type=float, default=0.1,
                    help="stop a row once its |expected error| is at most this (default 0.1)")
    ds.add_argument("--dsnot-gamma", type=float, default=1.0, help="variance exponent of the regrow ranking (default 1)")
    ds.add_argument("--dsnot-skip", nargs="+", default=None,
                    help="linears left as the base pruned them, by name or a dot part of it "
                         "(default: mlp fc1 fc2, the MLP linears; 'none' for none)")
    ri = pr.add_argument_group("RIA options")
    ri.add_argument("--ria-a", type=float, default=0.5, help="exponent a of the activation norm ‖X_j‖₂^a (default 0.5)")
    ri.add_argument("--ria-group", default="linear",
                    help="comparison group: linear (one threshold per matrix, default) or row")
    ri.add_argument("--ria-permute", action="store_true",
                    help="N:M channel permutation where exact (MLP down/fc2 inputs, with their producers)")
    d2 = pr.add_argument_group("D²Prune / SparseGPT options")
    d2.add_argument("--s", type=float, default=1500.0, help="activation scale s (default 1500)")
    d2.add_argument("--auto-s", "--auto_s", action="store_true", help="s = the model's max_position_embeddings")
    d2.add_argument("--r1", type=float, default=1.0, help="weight λ1 of the y·|W|·x term (default 1)")
    d2.add_argument("--r2", type=float, default=0.0, help="weight λ2 of the W²x² term, subtracted (default 0)")
    d2.add_argument("--target-layers", "--target_layer_names", nargs="+", default=None,
                    help="linears pruned without update (default self_attn.k_proj; 'none' for none)")
    d2.add_argument("--d2-wanda", "--d2_wanda", action=argparse.BooleanOptionalAction, default=True,
                    help="D² terms in the no-update branch (default on)")
    d2.add_argument("--d2-sparsegpt", "--d2_sparsegpt", action=argparse.BooleanOptionalAction, default=True,
                    help="D² terms in the update branch (default on)")
    d2.add_argument("--stats-mode", default="mean", help="mean (default) or reference (bit-faithful recurrences)")
    d2.add_argument("--wanda-x-exponent", type=float, default=1.0, help="X exponent of the r1 term, no-update branch")
    d2.add_argument("--percdamp", type=float, default=0.01, help="Hessian damping, fraction of mean diag (default 0.01)")
    d2.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block (default 128)")
    al = pr.add_argument_group("ALPS options (alps, d2alps)")
    al.add_argument("--alps-rho", type=float, default=0.1, help="initial ADMM penalty rho (default 0.1)")
    al.add_argument("--alps-iters", type=int, default=300, help="at most this many ADMM iterations (default 300)")
    al.add_argument("--alps-cg-iters", type=int, default=10,
                    help="PCG iterations on the final support (default 10)")

    ev = sub.add_parser("eval", help="evaluate a dense or saved model")
    _add_model_args(ev)

    ft = sub.add_parser("finetune", help="LoRA recovery fine-tuning of a pruned model that keeps its zeros")
    _add_model_args(ft)
    ft.add_argument("--data", default="c4", help="training text: c4, a file or a folder (default c4)")
    ft.add_argument("--max-train-samples", type=int, default=None, help="use the first N blocks (default: all)")
    ft.add_argument("--block-size", type=int, default=1024, help="tokens per training block (default 1024)")
    ft.add_argument("--epochs", type=int, default=1, help="passes over the blocks (default 1)")
    ft.add_argument("--max-steps", type=int, default=None, help="stop after K optimizer steps (overrides --epochs)")
    ft.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, AdamW (default 1e-4)")
    ft.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up steps, then linear decay (default 5)")
    ft.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    ft.add_argument("--batch-size", type=int, default=1, help="blocks per forward (default 1)")
    ft.add_argument("--effective-batch-size", type=int, default=128,
                    help="blocks per optimizer step, by gradient accumulation (default 128)")
    ft.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    ft.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / r (default 16)")
    ft.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input (default 0.05)")
    ft.add_argument("--lora-targets", default="q_proj,v_proj", help="comma list of linear names (default q_proj,v_proj)")
    ft.add_argument("--save-steps", type=int, default=None, help="checkpoint every K optimizer steps (and at the end)")
    ft.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUTPUT_DIR/checkpoints")
    ft.add_argument("--save", choices=["merged", "adapter", "both", "none"], default="merged",
                    help="OUTPUT_DIR/model (merged, plain transformers), OUTPUT_DIR/adapter (masked LoRA), both, none")
    ft.add_argument("--eval-before", action="store_true", help="also measure perplexity before fine-tuning")

    at = sub.add_parser("attention", help="attention-distribution diagnostics: dense vs pruned, per layer")
    at.add_argument("dense", help="the dense model (folder, Hub id, .gguf or smollm2-135m)")
    at.add_argument("pruned", help="the pruned model (e.g. a folder written by --save-model)")
    at.add_argument("--output-dir", "--output_dir", required=True, help="folder for attention.json and attention.png")
    at.add_argument("--data", default="c4", help="held-out text source (default c4)")
    at.add_argument("--windows", type=int, default=8, help="held-out windows (default 8)")
    at.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    at.add_argument("--seed", type=int, default=1234, help="seed of the held-out draw (default 1234; calibration uses 0)")
    at.add_argument("--top-k", type=int, default=8, help="keys counted in the top-k attention mass (default 8)")
    at.add_argument("--dtype", default="float32")
    at.add_argument("--device", default="cpu")
    at.add_argument("--data-dir", "--data_dir", default=None)
    at.add_argument("--no-progress", action="store_true")
    return parser


def _method_config(args: argparse.Namespace):
    from d2prune.methods import METHODS, method_config

    name = str(args.method).strip().lower()
    if name not in METHODS:
        raise UserError(f"unknown method {args.method!r}: choose one of {', '.join(sorted(METHODS))}")
    options = {
        "s": args.s, "auto_s": args.auto_s, "r1": args.r1, "r2": args.r2,
        "d2_wanda": args.d2_wanda, "d2_sparsegpt": args.d2_sparsegpt, "stats_mode": args.stats_mode,
        "wanda_x_exponent": args.wanda_x_exponent, "percdamp": args.percdamp, "blocksize": args.blocksize,
        "rho": args.alps_rho, "admm_iters": args.alps_iters, "cg_iters": args.alps_cg_iters,
        "a": args.ria_a, "group": args.ria_group, "permute": args.ria_permute,  # RIAConfig's fields
        "refit_target_layers": args.refit_target_layers,
    }
    targets = _target_layers(args.target_layers)
    if targets is not None and targets != ["auto"]:
        options["target_layers"] = targets
    if args.gradient_cache:
        options["gradient_cache"] = args.gradient_cache
    options.update(max_cycles=args.dsnot_cycles, update_threshold=args.dsnot_threshold, gamma=args.dsnot_gamma)
    if args.dsnot_skip is not None:
        options["skip"] = [] if [s.lower() for s in args.dsnot_skip] == ["none"] else args.dsnot_skip

    def build(key: str):
        fields = {f.name for f in dataclasses.fields(METHODS[key])}
        kwargs = {k: v for k, v in options.items() if k in fields}
        if "base" in fields:  # a method that refines another's mask (DSnoT): the base from the same options
            base = str(args.dsnot_base).strip().lower()
            if base not in METHODS:
                raise UserError(f"unknown --dsnot-base {args.dsnot_base!r}: choose one of {', '.join(sorted(METHODS))}")
            kwargs["base"] = base if base == key else build(base)  # its own base: the config says why not
        return method_config(key, **kwargs)

    config = build(name)
    if args.refit_target_layers and not any(
        "refit_target_layers" in {f.name for f in dataclasses.fields(c)} for c in (config, getattr(config, "base", None)) if c
    ):
        raise UserError(f"--refit-target-layers applies to methods with no-update target layers, not to {name}")
    return config


def _layer_sparsities(values: list[str] | None) -> list[float] | None:
    if not values:
        return None
    if len(values) == 1 and Path(values[0]).is_file():
        try:
            data = json.loads(Path(values[0]).read_text())
            return [float(v) for v in data]
        except (ValueError, TypeError):
            raise UserError(f"{values[0]} must hold a JSON list of per-layer sparsities") from None
    try:
        return [float(v) for v in values]
    except ValueError:
        raise UserError(f"--layer-sparsities takes numbers or one JSON file, got {' '.join(values)!r}") from None


def _pattern(args: argparse.Namespace) -> str:
    if args.prune_n or args.prune_m:
        return f"{args.prune_n}:{args.prune_m}"
    return args.pattern


def _evaluate(model, tokenizer, args, label: str, results: dict) -> None:
    """Perplexity on every --eval set; ``model`` is a model in memory or the folder of one that is
    evaluated layer by layer from disk (--offload disk)."""
    from d2prune.data import get_eval_tokens
    from d2prune.evaluation.perplexity import evaluate_ppl
    from d2prune.streaming import evaluate_streamed

    streamed = isinstance(model, Path)
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
            with distributed.current().sync(f"reading the evaluation data {source}"):
                tokens = get_eval_tokens(tokenizer, source, data_dir=args.data_dir_path, cache_dir=args.cache_dir_path)
            options = dict(batch_size=args.eval_batch_size, max_windows=args.eval_windows, progress=not args.no_progress)
            if streamed:
                res = evaluate_streamed(
                    model, tokens, args.seqlen, dtype=args.dtype, device=args.device,
                    activation_offload=args.activation_offload, threshold=args.offload_threshold, **options,
                )
            else:
                res = evaluate_ppl(model, tokens, args.seqlen, **options)
            results.setdefault(label, {})[name] = res.to_dict()
    finally:
        if not streamed:
            model.to(home)


def _zero_shot(model, tokenizer, args: argparse.Namespace) -> dict:
    from d2prune.evaluation.zeroshot import format_zero_shot_table, run_zero_shot

    tasks = args.tasks
    if tasks.strip().startswith("["):
        tasks = ",".join(_target_layers([tasks]) or [])
    result = run_zero_shot(
        model, tokenizer, tasks=tasks, data_dir=args.data_dir_path, limit=args.limit,
        batch_size=args.zero_shot_batch_size, device=args.device,
    )
    print(format_zero_shot_table(result))
    return result


def _evaluate_all(model, tokenizer, args, label: str, ppl: dict, record: dict, timings: dict) -> None:
    """Perplexity on every --eval set, then zero-shot accuracy if asked; timings per phase."""
    t0 = time.perf_counter()
    _evaluate(model, tokenizer, args, label, ppl)
    timings["eval" if label == "model" else f"eval_{label}"] = time.perf_counter() - t0
    world = distributed.current()
    if world.size > 1:
        # The last collective step: rank 0 alone may then run zero-shot tasks and save, and the
        # other ranks must not wait for that.
        record["distributed"] = _ranks_record(world, args, timings)
    if args.zero_shot and world.rank == 0:  # lm-eval runs whole, on rank 0 only
        t0 = time.perf_counter()
        record["zero_shot"] = _zero_shot(model, tokenizer, args)
        timings["zero_shot"] = time.perf_counter() - t0


def _sources(args: argparse.Namespace, calib: str | None) -> list[dict]:
    from d2prune.data import source_info

    names = ([calib] if calib else []) + [
        (args.eval_data_path if (i == 0 and args.eval_data_path) else e) for i, e in enumerate(args.eval) if e.lower() != "none"
    ]
    out = []
    for name in names:
        try:
            out.append(source_info(name, args.data_dir_path))
        except UserError:
            out.append({"source": name, "path": None, "sha256": None})
    return out


def _run_attention(args: argparse.Namespace) -> int:
    from d2prune.evaluation.attention import run_attention
    from d2prune.data import default_data_dir

    result = run_attention(
        args.dense, args.pruned, args.output_dir, data_source=args.data, nwindows=args.windows, seqlen=args.seqlen,
        seed=args.seed, top_k=args.top_k, dtype=args.dtype, device=args.device,
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(), progress=not args.no_progress,
    )
    from d2prune.evaluation.attention import format_attention_table

    print(format_attention_table(result))
    print(f"attention record: {Path(args.output_dir) / 'attention.json'}")
    return 0


def _finetune_config(args: argparse.Namespace):
    from d2prune.finetune import FinetuneConfig

    return FinetuneConfig(
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
        lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        effective_batch_size=args.effective_batch_size, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, save_steps=args.save_steps, seed=args.seed, device=args.device,
        progress=not args.no_progress,
    )


def _run_finetune(args: argparse.Namespace, model, tokenizer, record: dict, timings: dict) -> int:
    """``d2prune finetune``: masked LoRA on a pruned model, exact merge, evaluation, save, record."""
    from d2prune.data import get_train_blocks

    try:
        from d2prune.finetune import finetune, linear_zeros, merge_masked_lora, plot_loss, save_adapter
    except ImportError as exc:
        raise UserError(f"d2prune finetune needs peft: pip install 'd2prune[finetune]' ({exc})") from None
    from d2prune.io.models import load_sparsity_record, model_seqlen, save_pruned
    from d2prune.io.record import format_table, write_json_atomic

    config = _finetune_config(args)
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
    blocks = get_train_blocks(tokenizer, args.data, block_size=args.block_size, max_samples=args.max_train_samples,
                              data_dir=args.data_dir_path, cache_dir=args.cache_dir_path)
    timings["train_data"] = time.perf_counter() - t0
    if args.max_train_samples and len(blocks) < args.max_train_samples:
        logging.getLogger("d2prune").warning("%s holds only %d blocks of %d tokens (asked for %d)", args.data,
                                             len(blocks), args.block_size, args.max_train_samples)
    if args.eval_before:
        t0 = time.perf_counter()
        _evaluate(model, tokenizer, args, "before", ppl)
        timings["eval_before"] = time.perf_counter() - t0

    report = finetune(model, blocks, config, checkpoint_dir=output_dir / "checkpoints", resume=args.resume,
                      sparsity_record=sparsity_record)
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
    _evaluate_all(model, tokenizer, args, "finetuned", ppl, record, timings)
    if args.save in ("merged", "both"):
        t0 = time.perf_counter()
        saved = dict(sparsity_record or {})
        saved.update(overall_sparsity=zeros_after / max(report.weights, 1),
                     linears={n: z / w for n, (z, w) in after.items()},
                     finetune={"base_model": args.model, **info})
        record["saved_model"] = str(save_pruned(model, tokenizer, output_dir / "model", saved))
        timings["save"] = time.perf_counter() - t0

    plot = plot_loss(report.loss_curve, output_dir / "loss.png", title=f"masked LoRA on {args.model}")
    record.update(
        finetune=info, loss_curve=report.loss_curve, loss_plot=str(plot) if plot else None,
        data={"source": args.data, "block_size": args.block_size, "blocks": report.n_blocks,
              "blocks_seen": report.blocks_seen, "tokens_seen": report.tokens_seen},
        sparsity={"before": report.overall_sparsity, "after": zeros_after / max(report.weights, 1),
                  "zeros_before": report.zeros, "zeros_after": zeros_after, "weights": report.weights},
        sources=_sources(args, args.data), perplexity=ppl, timings=timings, seed=args.seed, seqlen=args.seqlen,
    )
    row = {"steps": report.steps, "tokens": report.tokens_seen,
           "first loss": report.loss_curve[0]["loss"] if report.loss_curve else None,
           "last loss": report.loss_curve[-1]["loss"] if report.loss_curve else None,
           "sparsity": zeros_after / max(report.weights, 1)}
    for name in args.eval:
        if name.lower() != "none":
            if args.eval_before:
                row[f"ppl before ({name})"] = ppl["before"][name]["ppl"]
            row[f"ppl after ({name})"] = ppl["finetuned"][name]["ppl"]
    row["train s"] = report.train_seconds
    print(format_table([row], list(row)))
    print(f"run record: {write_json_atomic(output_dir / 'run.json', record)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.command == "attention":
        return _run_attention(args)
    if args.command == "finetune" and not args.output_dir:
        raise UserError("finetune needs --output-dir (model, checkpoints and run record go there)")
    from d2prune.data import default_data_dir
    from d2prune.io.models import load_model, save_pruned
    from d2prune.finetune import adapters as _adapters  # noqa: F401 - load_model then opens adapter folders
    from d2prune.io.record import command_line, format_table, package_versions, write_json_atomic

    args.model = args.model or args.model_opt
    if not args.model:
        raise UserError("no model given: pass a model folder, a Hub id, a .gguf file or 'smollm2-135m'")
    from d2prune.engine.activations import check_mode
    from d2prune.streaming import RESUME_UNDER_TORCHRUN, resolve_offload

    world = distributed.current()
    check_mode(args.activation_offload)
    if args.offload_threshold <= 0:
        raise UserError(f"--offload-threshold is a fraction of the available memory (> 0), got {args.offload_threshold}")
    if args.command == "prune" and args.resume:
        if world.size > 1:
            raise UserError(RESUME_UNDER_TORCHRUN)
        if args.output_dir and Path(args.output_dir).resolve() != Path(args.resume).resolve():
            raise UserError(f"--resume {args.resume} and --output-dir {args.output_dir} name different folders")
        if args.offload == "none":
            raise UserError("--resume continues a run that streamed the model from disk; it cannot use --offload none")
        args.output_dir, args.offload = args.resume, "disk"
    if args.command == "finetune":
        if args.offload == "disk":
            raise UserError("finetune trains the whole model in memory; --offload disk applies to prune and eval")
        args.offload = "none"
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
    streamed = offload["weights"] == "disk"
    if streamed:
        from d2prune.streaming import limit_heap_retention

        limit_heap_retention()  # before the calibration data and the layers come and go
    if args.seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {args.seqlen}")
    args.data_dir_path = Path(args.data_dir) if args.data_dir else default_data_dir()
    args.cache_dir_path = Path(args.cache_dir) if args.cache_dir else None
    record: dict[str, Any] = {
        "command": command_line(), "versions": package_versions(), "model": args.model, "offload": offload,
    }
    timings: dict[str, float] = {}
    ppl: dict[str, dict] = {}
    output_dir = Path(args.output_dir) if args.output_dir else None

    config = None
    if args.command == "prune":
        from d2prune.config import PruneConfig

        config = PruneConfig(
            method=_method_config(args), sparsity=args.sparsity, pattern=_pattern(args), device=args.device,
            batch_size=args.batch_size, measure_error=not args.no_measure_error, progress=not args.no_progress,
            sparsity_profile=args.sparsity_profile, owl_lambda=args.owl_lambda, owl_m=args.owl_m,
            layer_sparsities=_layer_sparsities(args.layer_sparsities), activation_offload=args.activation_offload,
            offload_threshold=args.offload_threshold, refit=args.refit, refit_iters=args.refit_iters,
            # Next to the output rather than in /tmp, which is often a RAM disk.
            activation_dir=str(output_dir / ".activations") if output_dir else None,
        )
        args.auto_target = _target_layers(args.target_layers) == ["auto"]
        if args.auto_target and "target_layers" not in {f.name for f in dataclasses.fields(config.method)}:
            raise UserError(f"--target-layers auto applies to methods with un-updated projections (d2prune, d2alps), "
                            f"not to {config.method.name}")
        if args.nsamples < 1:
            raise UserError(f"--nsamples must be at least 1, got {args.nsamples}")
        if args.save_model and output_dir is None and args.save_model is True:
            raise UserError("--save-model without a path needs --output-dir")
        if streamed:
            _check_streamable_run(args, config, output_dir)
    if streamed and args.zero_shot:
        raise UserError("--zero-shot needs the whole model in memory; use --offload none")

    from d2prune.io.models import check_device

    t0 = time.perf_counter()
    with world.sync("loading the model"):  # [distributed] a rank that cannot load stops them all
        check_device(args.device)
        if streamed:
            from transformers import AutoTokenizer

            # The weights stay on disk; the model stands for its folder from here on.
            model, tokenizer = Path(args.model).expanduser(), AutoTokenizer.from_pretrained(args.model)
        else:
            model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    timings["load"] = time.perf_counter() - t0

    if args.command == "finetune":
        return _run_finetune(args, model, tokenizer, record, timings)

    if args.command == "eval":
        _evaluate_all(model, tokenizer, args, "model", ppl, record, timings)
        if world.rank > 0:  # only rank 0 prints and writes
            return 0
        record.update(perplexity=ppl, timings=timings, sources=_sources(args, None), seqlen=args.seqlen)
        rows = [{"set": k, "ppl": v["ppl"], "windows": v["n_windows"], "tokens": v["n_tokens"]} for k, v in ppl.get("model", {}).items()]
        if rows:
            print(format_table(rows, ["set", "ppl", "windows", "tokens"]))
        if output_dir:
            write_json_atomic(output_dir / "run.json", record)
        return 0

    from d2prune.data import get_calibration
    from d2prune.engine.walk import prune

    calib_source = args.calib_data_path or args.calib
    t0 = time.perf_counter()
    with world.sync("reading the calibration data"):
        calibration = get_calibration(
            tokenizer, calib_source, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
            data_dir=args.data_dir_path, cache_dir=args.cache_dir_path,
        )
    timings["calibration_data"] = time.perf_counter() - t0

    if args.eval_dense:
        t0 = time.perf_counter()
        _evaluate(model, tokenizer, args, "dense", ppl)
        timings["eval_dense"] = time.perf_counter() - t0

    if config.method.needs_gradients and args.gradient_source:
        with world.sync("reading the gradient data"):
            config.method = dataclasses.replace(config.method, gradient_source=get_calibration(
                tokenizer, args.gradient_source, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                data_dir=args.data_dir_path, cache_dir=args.cache_dir_path,
            ))

    t0 = time.perf_counter()
    if streamed:
        from d2prune.streaming import prune_checkpoint, work_dir

        target = Path(args.save_model) if args.save_model not in (None, True) else output_dir / "model"
        args.interrupt_hint = (
            f"progress is kept in {work_dir(target)}; add --resume {output_dir} to the same command to continue"
            + (" (in one process, without torchrun)" if world.size > 1 else "")
        )
        report, model = prune_checkpoint(
            args.model, calibration, config, target, dtype=args.dtype, resume=bool(args.resume),
        )
        args.interrupt_hint = None
        record["saved_model"] = str(target)
    elif args.auto_target:
        from d2prune.data import get_heldout
        from d2prune.methods.target_search import choose_target_layers

        with world.sync("reading the held-out data"):
            heldout = get_heldout(
                tokenizer, args.heldout_source or calib_source, nsamples=args.heldout_windows, seqlen=args.seqlen,
                calib_nsamples=args.nsamples, calib_seed=args.seed, seed=args.heldout_seed, data_dir=args.data_dir_path,
            )
        report, record["target_search"] = choose_target_layers(model, calibration, heldout, config)
        record["target_search"]["heldout_source"] = args.heldout_source or calib_source
        record["target_search"]["heldout_seed"] = args.heldout_seed
    else:
        report = prune(model, calibration, config)
    timings["prune"] = time.perf_counter() - t0

    _evaluate_all(model, tokenizer, args, "pruned", ppl, record, timings)
    if world.rank > 0:  # only rank 0 saves, prints and writes the run record
        return 0

    record.update(
        config=report.config, seed=args.seed, nsamples=args.nsamples, seqlen=args.seqlen,
        sources=_sources(args, calib_source), perplexity=ppl, timings=timings,
        prune_timings=report.timings, overall_sparsity=report.overall_sparsity, nm_structure_ok=report.nm_ok,
        layer_sparsities=report.layer_sparsities, outlier_ratios=report.outlier_ratios,
        activations=report.activations, resumed_at_layer=report.resumed_at_layer,
        linears=report.to_dict()["linears"],
    )
    if args.save_model and not streamed:
        target = Path(args.save_model) if args.save_model is not True else output_dir / "model"
        t0 = time.perf_counter()
        save_pruned(model, tokenizer, target, report.sparsity_record())
        timings["save"] = time.perf_counter() - t0
        record["saved_model"] = str(target)

    row = {
        "method": config.method.name, "pattern": str(config.pattern),
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
    print(format_table([row], list(row)))
    if output_dir:
        path = write_json_atomic(output_dir / "run.json", record)
        print(f"run record: {path}")
    return 0


def _ranks_record(world: distributed.World, args: argparse.Namespace, timings: dict) -> dict:
    """World size and backend, and per rank: host, device, peak RSS so far (MB) and prune seconds."""
    import resource
    import socket

    mine = {"rank": world.rank, "host": socket.gethostname(), "device": args.device,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "prune_s": timings.get("prune")}
    return {"world_size": world.size, "backend": world.backend, "timeout_s": world.timeout_s,
            "ranks": world.all_gathered(mine, "gathering the ranks' summaries")}


def _join_ranks(args: argparse.Namespace) -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the other ranks; True if a process group was started."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
        return False
    if args.command not in ("prune", "eval"):
        raise UserError(f"d2prune {args.command} runs in one process: launch it without torchrun")
    world, args.device = distributed.init_from_env(args.device, args.dist_timeout)
    if world.rank > 0:
        args.no_progress = True  # one set of progress bars, rank 0's
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s [rank {world.rank}] %(name)s: %(message)s",
                        force=True)
    return True


def _check_streamable_run(args: argparse.Namespace, config, output_dir: Path | None) -> None:
    """What a prune that streams the model from disk needs (it writes the model as it goes)."""
    if output_dir is None:
        raise UserError("--offload disk writes the pruned model as it goes: it needs --output-dir")
    if args.auto_target:
        raise UserError("--target-layers auto prunes several copies of the model in memory; use --offload none")
    if config.method.needs_gradients:
        raise UserError(f"{config.method.name} needs a full-model gradient pass; use --offload none")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    joined = False
    try:
        joined = _join_ranks(args)
        return _run(args)
    except UserError as e:
        print(f"d2prune: error: {e}", file=sys.stderr)
        return 2
    except distributed.PeerError as e:
        print(f"d2prune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None) or "no run record or model was written for this run"
        print(f"d2prune: interrupted; {hint}", file=sys.stderr)
        if args.command == "finetune" and args.save_steps:
            print(f"d2prune: rerun with --resume to continue from the checkpoints in {args.output_dir}/checkpoints",
                  file=sys.stderr)
        return 130
    finally:
        if joined:
            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
