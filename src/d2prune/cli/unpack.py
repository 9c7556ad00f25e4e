"""``d2prune unpack IN OUT``: a sparse folder → a plain dense folder ``from_pretrained`` loads."""

from __future__ import annotations

import argparse
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "unpack",
        help="turn a sparse folder back into a plain transformers folder",
        description="Write the dense model folder (model.safetensors, bit-identical to the dense save) of "
        "the sparse folder IN to OUT (atomic).",
    )
    p.add_argument("input", metavar="IN", help="sparse folder (from 'd2prune pack' or --save-format sparse)")
    p.add_argument("output", metavar="OUT", help="dense folder to write")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from d2prune.io.sparse import unpack_folder

    t0 = time.perf_counter()
    out = unpack_folder(args.input, args.output)
    print(f"unpacked {out} in {time.perf_counter() - t0:.1f} s")
    return 0
