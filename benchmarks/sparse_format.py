"""Sizes and speed of sparse folders (``--save-format sparse``, ``d2prune pack``) on SmolLM2-135M in bfloat16.

For each pattern (unstructured 50 % and 70 %, 2:4) SmolLM2-135M is magnitude-pruned (the format does
not depend on the method), then saved dense and sparse. Reported: the decoder linears' stored bytes
(values + mask or N:M indices) and the whole folder against the dense save, and, measured in the
same process (median of ``--repeats`` interleaved runs), the sparse save, load (``load_model``, as
every d2prune command loads), ``pack`` and ``unpack`` against the dense save and load (``unpack``
writes a whole dense folder, fsync included, so its peer is the dense save; against a load it is
shown too). The garbage collector is paused during each timed operation, as ``timeit`` does. Every
sparse load is checked bit-identical to the dense one. Results: ``benchmarks/results/sparse_format.json``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_format.py
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from d2prune import PruneConfig, prune  # noqa: E402
from d2prune.io.models import DEFAULT_MODEL, load_model, save_pruned  # noqa: E402
from d2prune.io.record import format_table, package_versions  # noqa: E402
from d2prune.io.sparse import folder_bytes, pack_folder, read_index, unpack_folder  # noqa: E402
from d2prune.io.sparse_codec import SEP  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sparse_format.json"
SETTINGS = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)]


def linear_bytes(folder: Path, model, linears: list[str]) -> tuple[int, int]:
    """(stored bytes, dense bytes) of the pruned linears' weights in a sparse folder."""
    from safetensors import safe_open

    itemsize = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}
    stored = 0
    for file in read_index(folder)["files"]:
        with safe_open(str(folder / file), framework="pt") as fh:
            for key in fh.keys():
                if key.split(SEP)[0].removesuffix(".weight") in linears:
                    part = fh.get_slice(key)
                    stored += int(torch.Size(part.get_shape()).numel()) * itemsize[part.get_dtype()]
    dense = sum(model.get_parameter(n + ".weight").numel() * 2 for n in linears)
    return stored, dense


def timed(fn) -> float:
    """Seconds of ``fn()`` with the garbage collector collected before and paused during, as ``timeit``
    does: otherwise a full collection (~0.2 s over the ~400k objects transformers creates) lands in
    whichever operation crosses the collector's threshold, and in a loop of the same operations the
    same kind keeps getting it."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def same_bits(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].view(torch.int16), sb[k].view(torch.int16)) for k in sa)


def run_setting(pattern: str, sparsity: float, repeats: int, work: Path) -> dict:
    model, tokenizer = load_model(DEFAULT_MODEL, dtype="bfloat16")
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(method="magnitude", sparsity=sparsity, pattern=pattern, measure_error=False, progress=False)
    report = prune(model, ids, config)
    record = report.sparsity_record()
    dense, sparse, packed, unpacked = (work / n for n in ("dense", "sparse", "packed", "unpacked"))
    times: dict[str, list[float]] = {k: [] for k in ("save", "save_sparse", "load", "load_sparse", "pack", "unpack")}
    for _ in range(repeats):  # interleaved, so that a busy moment of the machine hits every kind alike
        times["save"].append(timed(lambda: save_pruned(model, tokenizer, dense, record)))
        times["save_sparse"].append(timed(lambda: save_pruned(model, tokenizer, sparse, record, save_format="sparse")))
        times["load"].append(timed(lambda: load_model(str(dense), dtype="bfloat16")))
        times["load_sparse"].append(timed(lambda: load_model(str(sparse), dtype="bfloat16")))
        times["pack"].append(timed(lambda: pack_folder(dense, packed)))
        times["unpack"].append(timed(lambda: unpack_folder(packed, unpacked)))
    a, _ = load_model(str(dense), dtype="bfloat16")
    b, _ = load_model(str(sparse), dtype="bfloat16")
    c, _ = load_model(str(packed), dtype="bfloat16")
    identical = same_bits(a, b) and same_bits(a, c) and same_bits(a, model)
    identical = (
        identical and (unpacked / "model.safetensors").read_bytes() == (dense / "model.safetensors").read_bytes()
    )
    stored, dense_linear = linear_bytes(sparse, model, list(record["linears"]))
    median = {k: statistics.median(v) for k, v in times.items()}
    layouts = sorted({e["layout"] for e in read_index(sparse)["tensors"].values()})
    row = {
        "pattern": pattern,
        "sparsity": round(report.overall_sparsity, 4),
        "layouts": layouts,
        "dense_folder_bytes": folder_bytes(dense),
        "sparse_folder_bytes": folder_bytes(sparse),
        "linear_dense_bytes": dense_linear,
        "linear_sparse_bytes": stored,
        "linear_ratio": stored / dense_linear,
        "folder_ratio": folder_bytes(sparse) / folder_bytes(dense),
        "seconds": median,
        "ratios": {
            "save_sparse/save": median["save_sparse"] / median["save"],
            "load_sparse/load": median["load_sparse"] / median["load"],
            "pack/save": median["pack"] / median["save"],
            "unpack/load": median["unpack"] / median["load"],
            "unpack/save": median["unpack"] / median["save"],
        },
        "bit_identical": identical,
    }
    for p in (dense, sparse, packed, unpacked):
        shutil.rmtree(p, ignore_errors=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_setting(p, s, args.repeats, Path(tmp)) for p, s in SETTINGS]
    table = [
        {
            "pattern": f"{r['pattern']} {r['sparsity']:.0%}",
            "dense MB": r["dense_folder_bytes"] / 1e6,
            "sparse MB": r["sparse_folder_bytes"] / 1e6,
            "folder x": r["folder_ratio"],
            "linears x": r["linear_ratio"],
            "save x": r["ratios"]["save_sparse/save"],
            "load x": r["ratios"]["load_sparse/load"],
            "pack/save": r["ratios"]["pack/save"],
            "unpack/save": r["ratios"]["unpack/save"],
            "unpack/load": r["ratios"]["unpack/load"],
            "identical": r["bit_identical"],
        }
        for r in rows
    ]
    print(format_table(table, list(table[0])))
    if not args.no_write:
        result = {
            "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_format.py",
            "model": DEFAULT_MODEL,
            "dtype": "bfloat16",
            "method": "magnitude",
            "repeats": args.repeats,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "threads": torch.get_num_threads(),
            },
            "versions": package_versions(),
            "rows": rows,
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results: {RESULTS}")
    return 0 if all(r["bit_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
