"""``d2prune attention``: attention-distribution diagnostics, dense vs pruned, per layer."""

from __future__ import annotations

import argparse
from pathlib import Path

from d2prune.cli.options import add_compute_dtype, add_window_bos


def add_parser(sub: argparse._SubParsersAction) -> None:
    at = sub.add_parser("attention", help="attention-distribution diagnostics: dense vs pruned, per layer")
    at.add_argument("dense", help="the dense model (folder, Hub id, .gguf or smollm2-135m)")
    at.add_argument("pruned", help="the pruned model (e.g. a folder written by --save-model)")
    at.add_argument("--output-dir", "--output_dir", required=True, help="folder for attention.json and attention.png")
    at.add_argument("--data", default="c4", help="held-out text source (default c4)")
    at.add_argument("--windows", type=int, default=8, help="held-out windows (default 8)")
    at.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    at.add_argument(
        "--seed", type=int, default=1234, help="seed of the held-out draw (default 1234; calibration uses 0)"
    )
    add_window_bos(at)
    at.add_argument("--top-k", type=int, default=8, help="keys counted in the top-k attention mass (default 8)")
    at.add_argument("--dtype", default="float32")
    at.add_argument("--device", default="cpu")
    add_compute_dtype(at)
    at.add_argument("--data-dir", "--data_dir", default=None)
    at.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from d2prune.data import default_data_dir
    from d2prune.evaluation.attention import format_attention_table, run_attention

    result = run_attention(
        args.dense,
        args.pruned,
        args.output_dir,
        data_source=args.data,
        nwindows=args.windows,
        seqlen=args.seqlen,
        seed=args.seed,
        top_k=args.top_k,
        dtype=args.dtype,
        compute_dtype=args.compute_dtype,
        window_bos=args.window_bos,
        device=args.device,
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
        progress=not args.no_progress,
    )
    print(format_attention_table(result))
    print(f"attention record: {Path(args.output_dir) / 'attention.json'}")
    return 0
