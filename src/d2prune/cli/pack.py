"""``d2prune pack IN OUT``: a saved dense pruned folder → a sparse folder (kept values + mask)."""

from __future__ import annotations

import argparse
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="store a saved pruned model compactly (sparse folder: kept values + 1-bit mask)",
        description="Write the sparse form of the dense model folder IN to OUT (atomic; OUT may be IN). "
        "d2prune commands and d2prune.load_pretrained load it bit-identical; 'd2prune unpack' makes it dense.",
    )
    p.add_argument("input", metavar="IN", help="dense model folder (safetensors), e.g. from --save-model")
    p.add_argument("output", metavar="OUT", help="sparse folder to write")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from d2prune.io.sparse import folder_bytes, pack_folder

    t0 = time.perf_counter()
    out = pack_folder(args.input, args.output)
    before, after = folder_bytes(Path(args.input).expanduser()), folder_bytes(out)
    print(
        f"packed {out}: {after / 2**20:.1f} MiB ({after / max(before, 1):.2f}x of {args.input}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0
