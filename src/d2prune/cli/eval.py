"""``d2prune eval``: perplexity (and zero-shot accuracy) of a dense or saved model; top-1/top-5
accuracy (``--eval-images``) of an image classifier."""

from __future__ import annotations

import argparse
from pathlib import Path

from d2prune.cli import common, vision
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
    if args.vision:
        vision.check_options(args)
    else:
        vision.check_images_only(args)
        common.window_bos(args, model, tokenizer, record)

    common.evaluate_all(model, tokenizer, args, "model", ppl, record, timings)
    if distributed.current().rank > 0:  # only rank 0 prints and writes
        return 0
    if args.vision:
        record.update(accuracy=ppl, timings=timings, sources=vision.sources(args, None))
        if "model" in ppl:
            row = {"set": args.eval_images, **vision.summary_columns(ppl), "images": ppl["model"]["n_images"]}
            print(format_table([row], list(row)))
        if output_dir:
            write_json_atomic(output_dir / "run.json", record)
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
