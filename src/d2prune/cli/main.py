"""The ``d2prune`` parser and entry point: one subcommand module each (prune, sweep, eval, finetune,
attention, pack, unpack)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from dataclasses import dataclass

from d2prune.cli import attention, common, finetune, pack, prune, sweep, unpack
from d2prune.cli import eval as eval_command
from d2prune.cli.options import Parser
from d2prune.engine import distributed
from d2prune.errors import UserError

COMMANDS = {
    "prune": prune,
    "sweep": sweep,
    "eval": eval_command,
    "finetune": finetune,
    "attention": attention,
    "pack": pack,
    "unpack": unpack,
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="d2prune", description="One-shot post-training pruning of Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed command."""
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return COMMANDS[args.command].run(args)


@dataclass
class _Ranks:
    """Whether this process joined other ranks (torchrun), and whether its command returned."""

    joined: bool = False
    returned: bool = False


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    ranks = _Ranks()
    code = _run_reporting_errors(args, ranks)
    if ranks.joined:
        if not ranks.returned:
            # A failed peer may still hold its connections: leave without a teardown that could abort.
            distributed.exit_after_failure(code)
        distributed.shutdown()
    return code


def _run_reporting_errors(args: argparse.Namespace, ranks: _Ranks) -> int:
    """Run the command; a user's mistake, a failed peer or Ctrl-C becomes a message and an exit code.
    Fills in ``ranks``."""
    try:
        ranks.joined = common.join_ranks(args)
        code = run(args)
        ranks.returned = True
        return code
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
            print(
                f"d2prune: rerun with --resume to continue from the checkpoints in {args.output_dir}/checkpoints",
                file=sys.stderr,
            )
        return 130
    except Exception:
        if not ranks.joined:
            raise
        traceback.print_exc()  # a bug on one of several ranks: shown as Python shows it, then exit 1
        return 1
