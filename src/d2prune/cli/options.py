"""Options shared by the subcommands, and parsing helpers for option values."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from d2prune.engine import distributed
from d2prune.errors import UserError
from d2prune.methods.base import parse_names


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"d2prune: error: {message}\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model, data, evaluation, memory and zero-shot options of prune, eval and finetune."""
    p.add_argument("model", nargs="?", default=None, help="HF folder, Hub id, .gguf file, or 'smollm2-135m'")
    p.add_argument("--model", dest="model_opt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1, ... (default cpu)")
    add_compute_dtype(p)
    p.add_argument(
        "--data-dir", "--data_dir", default=None, help="data folder (env D2PRUNE_DATA; default ../shared/data)"
    )
    p.add_argument(
        "--cache-dir", "--data_cache_dir", default=None, help="token cache folder (default ~/.cache/d2prune)"
    )
    p.add_argument(
        "--seqlen", type=int, default=2048, help="tokens per calibration and evaluation window (default 2048)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    add_window_bos(p)
    p.add_argument(
        "--eval",
        "--eval_dataset",
        dest="eval",
        nargs="+",
        default=["wikitext2"],
        help="perplexity sets: wikitext2, ptb, a text file, or 'none' (default wikitext2)",
    )
    p.add_argument("--eval-data-path", "--eval_data_path", default=None, help="file or folder for the (first) eval set")
    p.add_argument(
        "--eval-images",
        default=None,
        metavar="DIR",
        help="image classifiers: top-1/top-5 accuracy on a labelled image folder (DIR/CLASS/IMAGE)",
    )
    p.add_argument("--eval-windows", type=int, default=None, help="use only the first K evaluation windows")
    p.add_argument(
        "--eval-batch-size", type=int, default=1, help="windows (or images) per evaluation forward (default 1)"
    )
    p.add_argument("--output-dir", "--output_dir", default=None, help="folder for run.json (and the saved model)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        help=f"under torchrun: seconds to wait for another rank before failing "
        f"(env {distributed.TIMEOUT_ENV}; default {distributed.DEFAULT_TIMEOUT_S:g})",
    )
    mem = p.add_argument_group("memory")
    mem.add_argument(
        "--offload",
        default="auto",
        help="disk: stream one decoder layer at a time from the safetensors folder; none: load the "
        "whole model; auto (default): disk when the weights exceed --offload-threshold of free RAM",
    )
    mem.add_argument(
        "--offload-threshold",
        type=float,
        default=0.5,
        help="fraction of the available memory that auto offloading allows (default 0.5; under "
        "torchrun shared equally by the ranks of a machine)",
    )
    mem.add_argument(
        "--activation-offload",
        default="auto",
        help="calibration activations in ram, in memory-mapped files on disk, or auto (default: disk "
        "when they exceed --offload-threshold of free RAM)",
    )
    zs = p.add_argument_group("zero-shot accuracy (lm-evaluation-harness, offline task data from the data dir)")
    zs.add_argument(
        "--zero-shot",
        "--eval-zero-shot",
        "--eval_zero_shot",
        dest="zero_shot",
        action="store_true",
        help="also run the zero-shot tasks",
    )
    zs.add_argument(
        "--tasks",
        default="paper",
        help="comma list (boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,piqa), "
        "'paper' (the first seven, default) or 'all'",
    )
    zs.add_argument("--limit", type=int, default=None, help="first K items of each task (quick runs)")
    zs.add_argument("--zero-shot-batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    zs.add_argument(
        "--zero-shot-scoring",
        choices=["shared-context", "lm-eval"],
        default="shared-context",
        help="shared-context (default): the choices of an item share one forward of their context; "
        "lm-eval: lm-eval's own scoring, one forward per choice (docs/evaluation.md#zero-shot)",
    )


def add_window_bos(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--window-bos",
        choices=["auto", "always", "never"],
        default="auto",
        help="BOS as the first token of every token window: always, never (the canonical windows), or auto "
        "(default: always for Gemma-family models, never for the others; docs/data.md#window-bos)",
    )


def add_compute_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compute-dtype",
        default="model",
        help="dtype the forwards run in: model (the --dtype, default), float32, bfloat16, float16, or auto "
        "(bfloat16 on CUDA >= 8.0 and CPUs with AMX or AVX512-BF16, else float32); weights keep --dtype",
    )


def argument_group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The parser's option group ``title``, made if it does not exist yet."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def task_list(tasks: str) -> str:
    """``--tasks`` as a comma list; the paper repository's ``"['boolq', 'rte']"`` is accepted too."""
    if tasks.strip().startswith("["):
        # The message names target layers, as it always has: the list syntax is the same.
        return ",".join(parse_names([tasks], "target layer"))
    return tasks


def layer_sparsities(values: list[str] | None) -> list[float] | None:
    """``--layer-sparsities``: numbers, or one JSON file holding a list of them."""
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


def pattern(args: argparse.Namespace) -> str:
    """``--pattern``, or the paper repository's ``--prune_n N --prune_m M``."""
    if args.prune_n or args.prune_m:
        return f"{args.prune_n}:{args.prune_m}"
    return args.pattern
