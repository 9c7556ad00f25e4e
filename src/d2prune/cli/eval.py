"""``d2prune eval``: perplexity (and zero-shot accuracy) of a dense or saved model."""

from __future__ import annotations

import argparse
from pathlib import Path

from d2prune.cli import common
from d2prune.cli.options import add_model_args
from d2prune.engine import distributed
from d2prune.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a dense or saved model")
    add_model_args(ev)


def run(args: argparse.Namespace) -> int:
    from d2prune.io.record import format_table, write_json_atomic

    common.check_model_options(args)
    offload = common.offload_policy(args)
    streamed = offload["weights"] == "disk"
    common.check_data_options(args)
    record = common.new_record(args, offload)
    timings: dict[str, float] = {}
    ppl: dict[str, dict] = {}
    output_dir = Path(args.output_dir) if args.output_dir else None
    if streamed and args.zero_shot:
        raise UserError("--zero-shot needs the whole model in memory; use --offload none")
    model, tokenizer = common.load(args, streamed, timings)
    common.window_bos(args, model, tokenizer, record)

    common.evaluate_all(model, tokenizer, args, "model", ppl, record, timings)
    if distributed.current().rank > 0:  # only rank 0 prints and writes
        return 0
    record.update(perplexity=ppl, timings=timings, sources=common.sources(args, None), seqlen=args.seqlen)
    rows = [
        {"set": k, "ppl": v["ppl"], "windows": v["n_windows"], "tokens": v["n_tokens"]}
        for k, v in ppl.get("model", {}).items()
    ]
    if rows:
        print(format_table(rows, ["set", "ppl", "windows", "tokens"]))
    if output_dir:
        write_json_atomic(output_dir / "run.json", record)
    return 0
